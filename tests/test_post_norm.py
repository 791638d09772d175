"""Gemma-2/3 add a normalised MLP output to the residual stream: the residual target is mapped back through that
norm, so an edit of the critical layer lands where the z-optimisation asked (tiny random Gemma-3)."""

from __future__ import annotations

import torch

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.editing.pipeline import EditSteps
from hf_encore.editing.requests import parse_requests, prepare_requests
from hf_encore.editing.targets import optimise_targets
from hf_encore.editing.tracing import ModelAccess, pad_right

from tiny_models import TINY_CORPUS

REQUEST = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}
LAYER = 2


def tiny_gemma3(vocab_size: int, layer_types: list[str] | None = None):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=256, sliding_window=128, initializer_range=0.2,
                              layer_types=layer_types)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.layers:  # Gemma's norms start at gain 1; real ones are far from it
            block.post_feedforward_layernorm.weight.normal_(0, 0.5)
    return model


def gap_to_target(tokenizer, corpus_path, monkeypatch, map_through_post_norm: bool) -> float:
    """‖h_L after − z‖ / ‖h_L before − z‖ at the subject's last token, editing only the critical layer with almost
    no regularisation (so the solve itself hits its target)."""
    model = tiny_gemma3(len(tokenizer))
    config = EncoreConfig(method="memit", layers=[LAYER], n_context_templates=0, preservation_weight=1e-6,
                          stats_n_tokens=2000, v_num_grad_steps=15, kl_factor=0.0,
                          clamp_norm_factor=0.1,  # a target the norm's outputs can nearly reach
                          map_through_post_norm=map_through_post_norm)
    peft = get_encore_model(model, config, tokenizer=tokenizer, corpus=corpus_path)
    access = ModelAccess(peft.base_model.model, peft.base_model._layout(config))
    prompt = prepare_requests(tokenizer, parse_requests([REQUEST]), ["{}"])[0].prompts[0]
    ids, mask = pad_right([prompt.ids], tokenizer.pad_token_id)

    def block_output() -> torch.Tensor:
        with torch.no_grad():
            return access.trace(ids, mask, block_outputs=[LAYER])[("block", LAYER)][0, prompt.subject_last].double()

    targets = {}
    recording = EditSteps(optimise_targets=lambda *a, **k: targets.setdefault("z", optimise_targets(*a, **k)))
    before = block_output()
    peft.edit([REQUEST], progress=False, steps=recording)
    z = targets["z"].z[0].double()
    return float((block_output() - z).norm() / (before - z).norm())


def test_mapping_through_the_post_mlp_norm_lands_on_the_target(tiny_tok, monkeypatch):
    mapped = gap_to_target(tiny_tok, TINY_CORPUS, monkeypatch, True)
    plain = gap_to_target(tiny_tok, TINY_CORPUS, monkeypatch, False)
    # Measured with the tiny tokenizer: 0.32 mapped (what is left is the part of the target no output of the norm
    # reaches), 0.73 plain (with SmolLM2's tokenizer 0.18 and 0.70).
    assert mapped < 0.4, mapped
    assert plain > 2 * mapped, (plain, mapped)


def test_layout_names_the_norm():
    from hf_encore.architectures import resolve_layout

    model = tiny_gemma3(100)
    access = ModelAccess(model, resolve_layout(model))
    assert access.post_mlp_norm(1) is model.model.layers[1].post_feedforward_layernorm
    m, normalised, gain = access.mlp_output_through_norm(1, torch.randn(128, 3, dtype=torch.float64))
    assert m.shape == normalised.shape == (64, 3) and gain.shape == (64,)
    expected_gain = 1 + model.model.layers[1].post_feedforward_layernorm.weight.double()
    torch.testing.assert_close(gain / gain[0], expected_gain / expected_gain[0], rtol=1e-4, atol=1e-4)
