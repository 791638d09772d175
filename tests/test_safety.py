"""Bad input is refused before anything changes; a failure inside a batch leaves the model exactly as it was (a tiny
random Llama editing all four of its layers, its tokenizer and corpus from tiny_models.py)."""

from __future__ import annotations

import pytest
import torch

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.editing.keys import keys_and_outputs
from hf_encore.editing.pipeline import EditSteps
from hf_encore.editing.targets import optimise_targets

from tiny_models import TINY_CORPUS, tiny_llama

GOOD = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}


@pytest.fixture
def model(tiny_tok):
    # The default layers: all four blocks, so that a failure can come after two layers have been written.
    config = EncoreConfig(method="encore", stats_n_tokens=2000, n_context_templates=2)
    return get_encore_model(tiny_llama(0), config, tokenizer=tiny_tok, corpus=TINY_CORPUS)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("bad,message", [
    ({**GOOD, "prompt": "LeBron James plays the sport of"}, "request 1: field 'prompt' must contain exactly one"),
    ({**GOOD, "prompt": "{} and {} play"}, "exactly one"),
    ({**GOOD, "subject": ""}, "request 1: field 'subject' must be a non-empty string"),
    ({**GOOD, "target_new": "   "}, "request 1: field 'target_new'"),
    ({k: v for k, v in GOOD.items() if k != "target_new"}, "field 'target_new'"),
    ("not a mapping", "request 1: expected a mapping"),
    ({**GOOD, "prompt": "{x} {}"}, "stray braces"),
])
def test_bad_request_raises_and_changes_nothing(model, bad, message):
    before = weights(model)
    with pytest.raises(ValueError, match=message):
        model.edit([GOOD, bad], progress=False)
    assert_unchanged(model, before)
    assert model.base_model.edit_states["default"].num_edits == 0


def test_empty_and_unknown_settings(model):
    with pytest.raises(ValueError, match="non-empty list"):
        model.edit([], progress=False)
    with pytest.raises(ValueError, match="Unknown EncoreConfig setting"):
        model.edit([GOOD], progress=False, v_learning_rate=0.1)
    with pytest.raises(ValueError, match="Unknown method"):
        EncoreConfig(method="rome")
    with pytest.raises(ValueError, match="v_lr"):
        EncoreConfig(v_lr=-1.0)


def test_unlocatable_subject_is_refused_before_any_change(model, monkeypatch):
    before = weights(model)
    # A tokenizer whose offsets never cover the subject (as with a subject that tokenises to nothing).
    import hf_encore.editing.requests as requests_module

    def no_subject(tokenizer, before_text, subject, after, add_special_tokens=True):
        raise ValueError(f"the subject {subject!r} could not be located")

    monkeypatch.setattr(requests_module, "tokenize_with_subject", no_subject)
    with pytest.raises(ValueError, match="request 0: the subject 'LeBron James' could not be located"):
        model.edit([GOOD], progress=False)
    assert_unchanged(model, before)


def test_failure_mid_batch_rolls_back_everything(model, monkeypatch):
    # A first, successful batch, so that there is earlier state to protect.
    model.edit([GOOD], progress=False, v_num_grad_steps=3)
    state = model.base_model.edit_states["default"]
    before = weights(model)
    moments = {k: v.clone() for k, v in state.prev_key_moments.items()}
    ledger_len, templates = len(state.ledger), list(state.context_templates)

    calls = {"n": 0}

    def failing_keys(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # two layers have already been written by now
            raise RuntimeError("injected failure")
        return keys_and_outputs(*args, **kwargs)

    other = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Lyon"}
    with pytest.raises(RuntimeError, match="injected failure"):
        model.edit([other], progress=False, v_num_grad_steps=3, steps=EditSteps(keys_and_outputs=failing_keys))
    assert calls["n"] == 3
    assert_unchanged(model, before)
    assert state.num_batches == 1 and len(state.ledger) == ledger_len and state.context_templates == templates
    assert state.prev_key_moments.keys() == moments.keys()
    assert all(torch.equal(state.prev_key_moments[k], v) for k, v in moments.items())


def test_nan_targets_roll_back(model, monkeypatch):
    before = weights(model)

    def nan_targets(*args, **kwargs):
        result = optimise_targets(*args, **kwargs)
        result.z[0, 0] = float("nan")
        return result

    with pytest.raises(FloatingPointError, match="non-finite"):
        model.edit([GOOD], progress=False, v_num_grad_steps=2, steps=EditSteps(optimise_targets=nan_targets))
    assert_unchanged(model, before)
    state = model.base_model.edit_states["default"]
    assert state.num_edits == 0 and state.context_templates is None and not state.prev_key_moments


def test_editing_a_merged_adapter_is_refused(model):
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        model.edit([GOOD], progress=False)
