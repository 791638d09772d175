"""The optimised steps against their executable specification (``hf_encore/editing/reference.py``) on a tiny model:
the same z (and stopping decisions), the same keys and block outputs, the same C₀ and the same deltas.

The optimised steps cache, batch and truncate (prefix states replayed above block L, logits only where needed,
shared template tokens run once, keys read from shortened prompts); the reference runs every request through the
whole model. Any disagreement beyond float32 rounding means one of those shortcuts changed what is computed — e.g.
after a transformers upgrade changes how caches or attention masks are passed.
"""

from __future__ import annotations

import pytest
import torch

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.architectures import resolve_layout
from hf_encore.editing.corpus import packed_chunks
from hf_encore.editing.keys import key_pass_inputs, keys_and_outputs
from hf_encore.editing.pipeline import target_settings
from hf_encore.editing.reference import (
    REFERENCE_STEPS,
    reference_key_pass_inputs,
    reference_keys_and_outputs,
    reference_optimise_targets,
    reference_second_moments,
)
from hf_encore.editing.requests import parse_requests, prepare_requests
from hf_encore.editing.stats import second_moments
from hf_encore.editing.targets import optimise_targets
from hf_encore.editing.tracing import ModelAccess

from tiny_models import TINY_CORPUS, tiny_llama

REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
    {"prompt": "The capital of {} is", "subject": "France", "target_new": "Lyon"},
    {"prompt": "{} was made by", "subject": "the Model T", "target_new": "Toyota Motors"},
]
TEMPLATES = ["{}", "It was a cold day. {}", "Once upon a time there. {}"]
LAYERS = [1, 2]
ROUNDING = dict(rtol=1e-4, atol=1e-5)  # float32 arithmetic in a different order


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=3)
    return model, ModelAccess(model, resolve_layout(model))


@pytest.fixture(scope="module")
def prepared(tiny_tok):
    return prepare_requests(tiny_tok, parse_requests(REQUESTS), TEMPLATES)


@pytest.mark.parametrize("mpes", [False, True])
def test_same_z_and_stopping(tiny, prepared, tiny_tok, mpes):
    _, access = tiny
    settings = target_settings(EncoreConfig(method="encore" if mpes else "memit", v_num_grad_steps=8))
    fast = optimise_targets(access, prepared, LAYERS[-1], settings, tiny_tok.pad_token_id, progress=False)
    spec = reference_optimise_targets(access, prepared, LAYERS[-1], settings, tiny_tok.pad_token_id, progress=False)
    torch.testing.assert_close(fast.h_init, spec.h_init, **ROUNDING)
    assert fast.steps == spec.steps and fast.mpes_stopped == spec.mpes_stopped
    assert max(fast.steps) > 0  # the optimisation moved: z is not simply h_init on both sides
    torch.testing.assert_close(fast.z, spec.z, **ROUNDING)
    torch.testing.assert_close(torch.tensor(fast.p_target_before), torch.tensor(spec.p_target_before), **ROUNDING)
    torch.testing.assert_close(torch.tensor(fast.final_loss), torch.tensor(spec.final_loss), **ROUNDING)


@pytest.mark.parametrize("layer", LAYERS)
def test_same_keys_and_outputs(tiny, prepared, tiny_tok, layer):
    _, access = tiny
    pad = tiny_tok.pad_token_id
    fast = keys_and_outputs(access, key_pass_inputs(access, prepared, LAYERS[0], pad, 4096), layer, LAYERS[-1])
    spec = reference_keys_and_outputs(access, reference_key_pass_inputs(access, prepared, LAYERS[0], pad, 4096),
                                      layer, LAYERS[-1])
    for got, want in zip(fast, spec):  # K, K_raw, H
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **ROUNDING)


def test_same_second_moments(tiny, tiny_tok):
    _, access = tiny
    chunks = packed_chunks(tiny_tok, TINY_CORPUS, 2000, 64)
    fast, n_fast = second_moments(access, chunks, LAYERS, tiny_tok.pad_token_id, 256, progress=False)
    spec, n_spec = reference_second_moments(access, chunks, LAYERS, tiny_tok.pad_token_id, 256, progress=False)
    assert n_fast == n_spec > 0
    for layer in LAYERS:
        torch.testing.assert_close(fast[layer], spec[layer], **ROUNDING)


@pytest.mark.parametrize("method", ["memit", "alphaedit", "encore"])
def test_same_deltas_through_the_pipeline(tiny_tok, stats_cache, method):
    def edited(steps):
        config = EncoreConfig(method=method, layers=list(LAYERS), v_num_grad_steps=6, n_context_templates=2,
                              context_template_length=4, stats_n_tokens=2000, stats_seq_len=64)
        model = get_encore_model(tiny_llama(seed=3), config, tokenizer=tiny_tok, corpus=TINY_CORPUS)
        kwargs = {} if steps is None else {"steps": steps}
        model.compute_statistics(progress=False, **kwargs)
        report = model.edit(REQUESTS, progress=False, **kwargs)
        return report, {layer: model.base_model.model.model.layers[layer].mlp.down_proj.encore_delta["default"]
                        for layer in LAYERS}

    fast_report, fast = edited(None)
    spec_report, spec = edited(REFERENCE_STEPS)
    assert [r.steps for r in fast_report.requests] == [r.steps for r in spec_report.requests]
    for layer in LAYERS:
        assert fast[layer].abs().max() > 0
        torch.testing.assert_close(fast[layer], spec[layer], rtol=1e-3, atol=1e-6)
