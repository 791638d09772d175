"""The family matrix: every row of the layout table, built as a tiny random model, edits, merges, saves and loads.

A family added to ``hf_encore.architectures.MODEL_LAYOUTS`` is picked up here without a change (its tiny config
comes from ``AutoConfig.for_model``; ``tiny_models.FAMILY_EXTRAS`` only where the shared sizes do not build it).
The families refused by design are checked to fail at ``get_encore_model`` with one clear line.
"""

from __future__ import annotations

import pytest
import torch

import hf_encore
from hf_encore import EncoreConfig, get_encore_model
from hf_encore.architectures import MODEL_LAYOUTS, REFUSED_FAMILIES, resolve_layout
from hf_encore.editing.stats import second_moments
from hf_encore.editing.tracing import ModelAccess
from hf_encore.layer import Linear

from tiny_models import TINY_CORPUS, TINY_EDIT, TINY_LAYERS, tiny_family, tiny_tokenizer

FAMILIES = sorted(MODEL_LAYOUTS)
FACTS = [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
         {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Paris"}]
# On a random model an edit moves p(target) only as far as the z-optimisation can push a nearly flat output
# distribution: larger steps than the defaults, no early stop, no KL or decay term, the raw prompt only. One edited
# layer and one fact per edit: spreading a target over layers, or fitting two random subjects' keys at once, is
# approximate enough on a 4-layer random model to cancel the small rise (real models: tests/test_editing.py).
# A strong edit, so that a tiny random model's p(target) visibly rises in every family (phi3's barely moves under
# ENCORE's default λ_p of 2): the matrix checks layouts, not how much a default setting edits.
MATRIX_EDIT = {**TINY_EDIT, "method": "encore", "mpes": False, "v_num_grad_steps": 25, "v_lr": 5.0,
               "v_weight_decay": 0.0, "kl_factor": 0.0, "n_context_templates": 0, "preservation_weight": 1.0}
MATRIX_LAYERS = [2]
MATRIX_D_K = 256  # keys of distinct tokens less alike than at 64


def ids_of(text: str) -> torch.Tensor:
    return tiny_tokenizer()(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_from_final_hidden_states_are_the_models(family):
    """What editing and evaluation compute from the final hidden states (unembedding, Cohere's scale, Gemma's
    softcap) is what the model outputs."""
    model = tiny_family(family)
    access = ModelAccess(model, resolve_layout(model))
    ids = ids_of("The Eiffel Tower is located in the city of")
    with torch.no_grad():
        hidden = access.final_hidden(ids, torch.ones_like(ids))
        torch.testing.assert_close(access.logits(hidden), model(input_ids=ids).logits.float())


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_are_the_second_moments_of_every_token_key(family):
    """C₀ from padded batches equals Σ kkᵀ / N over the keys W_out receives when each text runs alone (OPT feeds
    its MLP flattened [B·T, d] states; padding must not count)."""
    model = tiny_family(family)
    layout = resolve_layout(model)
    access = ModelAccess(model, layout)
    tokenizer = tiny_tokenizer()
    chunks = [tokenizer(text).input_ids for text in TINY_CORPUS[:5]]
    c0, count = second_moments(access, chunks, TINY_LAYERS, tokenizer.pad_token_id, max_tokens=10_000,
                               progress=False)
    assert count == sum(len(c) for c in chunks)
    for layer in TINY_LAYERS:
        seen: list[torch.Tensor] = []
        handle = access.w_out(layer).register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]))
        handle.remove()
        keys = torch.cat([k.reshape(-1, k.shape[-1]) for k in seen]).double()
        expected = keys.T @ keys / count
        assert float((c0[layer] - expected).norm() / expected.norm()) < 1e-5, (family, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_edits_merges_saves_and_loads(family, stats_cache, tmp_path):
    model = get_encore_model(tiny_family(family, d_k=MATRIX_D_K), EncoreConfig(layers=MATRIX_LAYERS, **MATRIX_EDIT),
                             tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)
    for fact in FACTS:  # sequentially: the second edit solves with the first one's keys in S_prev
        (request,) = model.edit([fact], progress=False).requests
        assert request.p_target_after > 1.01 * request.p_target_before, (family, request)

    ids = ids_of("LeBron James plays the sport of")
    with torch.no_grad():
        edited = model(input_ids=ids).logits
    wrapped = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(wrapped) == len(MATRIX_LAYERS)
    originals = [m.get_base_layer().weight.detach().clone() for m in wrapped]
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, edited, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(m.get_base_layer().weight, w) for m, w in zip(wrapped, originals))

    model.save_pretrained(tmp_path / "adapter")
    loaded = hf_encore.from_pretrained(tiny_family(family, d_k=MATRIX_D_K), tmp_path / "adapter",
                                       tokenizer=tiny_tokenizer())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, edited)


@pytest.mark.parametrize("family", sorted(set(REFUSED_FAMILIES) & {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}))
def test_mixture_of_experts_is_refused_at_get_encore_model_with_the_reason(family):
    extras = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2)}.get(
        family, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))
    with pytest.raises(ValueError, match=f"cannot edit a '{family}' model: its MLP is a mixture of experts") as err:
        get_encore_model(tiny_family(family, **extras), EncoreConfig(layers=list(TINY_LAYERS)))
    assert "\n" not in str(err.value)


def test_naming_the_experts_of_a_moe_layer_fails_with_the_reason():
    """Named by hand (block_path/mlp_out), a routed-experts MLP still fails at get_encore_model, not in a pass."""
    model = tiny_family("mixtral", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj does not exist \(MixtralSparseMoeBlock\)"
                                         r": its MLP is a mixture of experts"):
        get_encore_model(model, EncoreConfig(layers=[1], block_path="model.layers", mlp_out="mlp.down_proj"))
    with pytest.raises(ValueError, match=r"mlp\.experts is a MixtralExperts, not a linear layer"):
        get_encore_model(model, EncoreConfig(layers=[1], block_path="model.layers", mlp_out="mlp.experts"))


def test_post_norm_opt_is_refused_with_the_reason():
    model = tiny_family("opt", do_layer_norm_before=False)
    with pytest.raises(ValueError, match=r"'opt' model \(do_layer_norm_before=False\): this OPT \(opt-350m\) "
                                         r"normalises each block's output after the residual add"):
        get_encore_model(model, EncoreConfig(layers=list(TINY_LAYERS)))
