"""Tiny random models and adapters for the tests that need no real knowledge (save, load, guards, settings).

Everything here builds in well under a second and needs no tokenizer and no data.
"""

from __future__ import annotations

import torch

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.layer import Linear

TINY_LAYERS = [1, 2]
TINY_D_K = 64  # the intermediate size: the keys' dimension


def tiny_llama(seed: int = 0, vocab_size: int = 128, num_layers: int = 4):
    """A randomly initialised Llama with four 32-wide layers (seeded: the same seed gives the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=TINY_D_K,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def fill_adapter(model, seed: int = 0, adapter: str = "default") -> None:
    """Give an adapter random deltas and a plausible editing state, as if ``seed``-many edits had been made."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, Linear) and adapter in module.encore_delta:
            module.encore_delta[adapter].data = torch.randn(module.encore_delta[adapter].shape, generator=g) * 0.01
    state = model.base_model.edit_states[adapter]
    for layer in model.peft_config[adapter].layers:
        keys = torch.randn(TINY_D_K, 8, generator=g, dtype=torch.float64)
        state.prev_key_moments[layer] = keys @ keys.T
    state.context_templates = ["{}", "Once upon a time. {}"]
    state.num_edits, state.num_batches = 8 + seed, 1
    request = {"prompt": "{} plays the sport of", "subject": f"Player {seed}", "target_new": "football",
               "target_true": None}
    state.ledger = [{"batch": 1, "time": 1.7e9, "method": model.peft_config[adapter].method, "settings": {},
                     "requests": [request],
                     "report": {"requests": [{**request, "steps": 3, "mpes_stopped": False, "p_target_before": 0.01,
                                              "p_target_after": 0.9, "final_loss": 0.1}],
                                "layers": [{"layer": layer, "update_norm": 0.1, "weight_norm_ratio": 1.01}
                                           for layer in model.peft_config[adapter].layers]}}]


def tiny_adapter(seed: int = 0, base_seed: int = 0, method: str = "memit"):
    """(An EncorePeftModel on ``tiny_llama(base_seed)``, filled by :func:`fill_adapter`)."""
    model = get_encore_model(tiny_llama(base_seed), EncoreConfig(method=method, layers=list(TINY_LAYERS)))
    fill_adapter(model, seed)
    return model


def deltas(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's deltas by module name (copies)."""
    return {name: module.encore_delta[adapter].detach().clone() for name, module in model.named_modules()
            if isinstance(module, Linear) and adapter in module.encore_delta}
