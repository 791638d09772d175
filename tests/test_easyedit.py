"""``hf_encore.edit_facts``: EasyEdit's call and metrics shape."""

from __future__ import annotations

import pytest
import torch

import hf_encore
from hf_encore import EncoreConfig, get_encore_model
from hf_encore.easyedit import requests_from_inline
from hf_encore.evaluation import score_continuations

from tiny_models import TINY_CORPUS, TINY_EDIT, TINY_LAYERS, deltas, tiny_llama, tiny_tokenizer

PROMPTS = ["LeBron James plays the sport of", "The capital of Japan is"]
SUBJECTS = ["LeBron James", "Japan"]
TARGETS = ["football", "Paris"]
LOCALITY = {"neighborhood": {"prompt": ["Serena Williams plays the sport of", "The capital of France is"],
                             "ground_truth": ["tennis", "Paris"]}}


def test_inline_subjects_become_placeholders_and_a_missing_one_is_named():
    got = requests_from_inline(PROMPTS, TARGETS, SUBJECTS, ["basketball", None])
    assert got == [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football",
                    "target_true": "basketball"},
                   {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Paris"}]
    with pytest.raises(ValueError, match="request 1: the subject 'Tokyo' does not occur"):
        requests_from_inline(PROMPTS, TARGETS, ["LeBron James", "Tokyo"])


def test_edit_facts_writes_the_facts_and_returns_easyedits_metrics(stats_cache):
    model = get_encore_model(tiny_llama(), EncoreConfig(layers=list(TINY_LAYERS), **TINY_EDIT),
                             tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)
    tokenizer = tiny_tokenizer()
    with torch.no_grad():
        before = score_continuations(model, tokenizer, PROMPTS, TARGETS).token_accuracy
    metrics, edited = hf_encore.edit_facts(
        model, prompts=PROMPTS, target_new=TARGETS, subject=SUBJECTS, ground_truth=["basketball", "Tokyo"],
        rephrase_prompts=["LeBron James is a player of", "Japan has its capital in"], locality_inputs=LOCALITY,
        progress=False)
    assert edited is model
    state = model.base_model.edit_states["default"]
    assert state.num_edits == 2 and state.num_batches == 2  # one request per batch, sequential, with memory
    assert [m["case_id"] for m in metrics] == [0, 1]
    with torch.no_grad():
        after = score_continuations(model, tokenizer, PROMPTS, TARGETS).token_accuracy
    for i, record in enumerate(metrics):
        assert record["requested_rewrite"]["prompt"] == PROMPTS[i]
        assert record["requested_rewrite"]["subject"] == SUBJECTS[i]
        assert set(record["pre"]) == {"rewrite_acc", "rephrase_acc", "locality", "portability"}
        assert record["pre"]["rewrite_acc"] == [pytest.approx(float(before[i]))]
        assert record["post"]["rewrite_acc"] == [pytest.approx(float(after[i]))]
        assert 0.0 <= record["post"]["locality"]["neighborhood_acc"][0] <= 1.0
        assert record["time"] > 0
    assert any(d.abs().max() > 0 for d in deltas(model).values())


def test_edit_facts_wraps_a_plain_model_and_refuses_mismatched_lists(stats_cache):
    with pytest.raises(ValueError, match="target_new has 1 entries for 2 prompts"):
        hf_encore.edit_facts(tiny_llama(), prompts=PROMPTS, target_new=TARGETS[:1], subject=SUBJECTS,
                             tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)
    metrics, model = hf_encore.edit_facts(tiny_llama(), prompts=PROMPTS[0], target_new=TARGETS[0],
                                          subject=SUBJECTS[0], tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS,
                                          progress=False, **TINY_EDIT)
    assert isinstance(model, hf_encore.EncorePeftModel) and len(metrics) == 1
    assert "rephrase_acc" not in metrics[0]["post"] and metrics[0]["post"]["locality"] == {}
