"""C₀ text with factual statements in it: facts written out as sentences (``fact_statements``) and mixed with
generic text in equal shares of any prefix (``interleave_texts``)."""

from __future__ import annotations

import pytest

from hf_encore.editing.corpus import fact_statements, interleave_texts, read_corpus


def test_fact_statements_fill_the_subject_in_and_end_with_the_true_object():
    facts = [
        {"prompt": "{}, the", "subject": "Toko Yasuda", "target_true": "guitar",
         "rephrase_prompt": "Toko Yasuda is incredible at", "target_new": "piano"},
        {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "ground_truth": "French"},
        {"prompt": "{} plays", "subject": "Percy Snow", "target": " linebacker "},
    ]
    assert fact_statements(facts, per_text=2) == [
        "Toko Yasuda, the guitar. Toko Yasuda is incredible at guitar.",
        "The mother tongue of Danielle Darrieux is French. Percy Snow plays linebacker.",
    ]
    assert len(fact_statements(facts)) == 1  # eight to a text by default


@pytest.mark.parametrize("fact, message", [
    ({"prompt": "{} plays", "subject": "Percy Snow"}, "one of target_true, ground_truth, target"),
    ({"prompt": "He plays", "subject": "Percy Snow", "target": "golf"}, "neither '{}' nor the subject"),
    ({"subject": "Percy Snow", "target": "golf"}, "needs string fields prompt"),
    ("Percy Snow plays golf.", "expected a mapping"),
])
def test_a_fact_without_what_a_statement_needs_is_named(fact, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fact_statements([{"prompt": "{} is", "subject": "A", "target": "B"}, fact])


def test_per_text_must_be_positive():
    with pytest.raises(ValueError, match="per_text"):
        fact_statements([], per_text=0)


def test_every_prefix_of_the_interleaving_holds_equal_shares():
    short = [f"fact {i:03d}." for i in range(300)]  # 9 characters each
    long = [f"paragraph {i:03d} " + "x" * 80 for i in range(60)]  # 94 characters each, 5,640 in all
    mixed = interleave_texts(short, long)
    assert sorted(mixed) == sorted(short + long)
    assert [t for t in mixed if t in short] == short and [t for t in mixed if t in long] == long  # orders kept
    assert mixed[0] == short[0]  # a tie goes to the earlier source
    size = {"short": 0, "long": 0}
    for text in mixed:
        size["short" if text in short else "long"] += len(text)
        if size["long"] < 5_640 and size["short"] < 2_700:  # both still running
            assert abs(size["short"] - size["long"]) <= 94
    # The facts (2,700 characters) run out first; the paragraphs left over follow, in order.
    tail = mixed[mixed.index(short[-1]) + 1:]
    assert tail == long[-len(tail):] and len(tail) >= 25


def test_blank_texts_are_left_out_and_the_result_is_a_corpus():
    mixed = interleave_texts(["a fact.", "  "], ["", "generic text"])
    assert mixed == ["a fact.", "generic text"]
    assert read_corpus(mixed).texts == mixed
