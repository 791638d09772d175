"""GPT-2's transposed Conv1D path on a tiny randomly initialised model, and the model-generated-corpus fallback."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.layer import Linear


@pytest.fixture
def tokenizer(tiny_tok):
    """The tiny byte-level BPE tokenizer of tiny_models.py (not the real model's)."""
    return tiny_tok


@pytest.fixture
def tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    # A wider initialisation than GPT-2's 0.02 gives peaked logits that a z-optimisation can move.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=4, n_head=4,
                        initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def test_conv1d_delta_orientation_and_exact_unmerge(tiny_gpt2, tokenizer):
    model = get_encore_model(tiny_gpt2, EncoreConfig(method="memit", layers=[1, 2]), tokenizer=tokenizer)
    wrapped = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(wrapped) == 2 and all(m.transposed for m in wrapped)
    assert wrapped[0].encore_delta["default"].shape == (64, 256)  # [d_v, d_k], W_out's orientation
    torch.manual_seed(1)
    for m in wrapped:
        m.encore_delta["default"].data.normal_(0, 0.05)
    ids = tokenizer("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        adapted = model(**ids).logits
        original = [m.get_base_layer().weight.detach().clone() for m in wrapped]
        model.merge_adapter()
        merged = model(**ids).logits
        model.unmerge_adapter()
        unmerged_weights = [m.get_base_layer().weight for m in wrapped]
        with model.disable_adapter():
            plain = model(**ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, adapted)
    assert all(torch.equal(a, b) for a, b in zip(original, unmerged_weights))


def test_edit_runs_on_gpt2_with_generated_corpus(tiny_gpt2, tokenizer, caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path))  # no statistics cached by an earlier run
    config = EncoreConfig(method="memit", layers=[1, 2], stats_n_tokens=600, v_num_grad_steps=20)
    model = get_encore_model(tiny_gpt2, config, tokenizer=tokenizer)
    with caplog.at_level("WARNING", logger="hf_encore"):
        report = model.edit([{"prompt": "{} plays the sport of", "subject": "LeBron James",
                              "target_new": "football"}], progress=False)
    assert "generating 600 tokens of text with the model itself" in caplog.text
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2  # one cached C₀ per edited layer
    assert report.requests[0].p_target_after > 1.2 * report.requests[0].p_target_before
    assert [lay.layer for lay in report.layers] == [1, 2]


def test_generated_corpus_samples_whole_batches_reproducibly(tiny_gpt2, tokenizer):
    from hf_encore.editing.corpus import generated_corpus, generated_corpus_id

    calls = []
    generate = tiny_gpt2.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    tiny_gpt2.generate = counted
    first = generated_corpus(tiny_gpt2, tokenizer, 300, seed=1, batch=6, length=20)
    # Batches of sequences, not one sequence per call; the last only as many as the budget still needs (300 tokens
    # in sequences of about 21: two full batches of 6, then 3).
    assert calls == [6, 6, 3]
    assert len(first.texts) == sum(calls) and len(set(first.texts)) > 1
    # No text carries padding or an end-of-text token.
    assert all("<|endoftext|>" not in t for t in first.texts)
    assert first.corpus_id == generated_corpus_id(1, 300)
    assert generated_corpus(tiny_gpt2, tokenizer, 300, seed=1, batch=6, length=20).texts == first.texts
    assert generated_corpus(tiny_gpt2, tokenizer, 300, seed=2, batch=6, length=20).texts != first.texts
