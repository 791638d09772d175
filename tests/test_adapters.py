"""Several Encore adapters on one base: add, switch, disable, combine, delete, save/load all, merging several (on the
tiny random Llama of tiny_models.py); and a GGUF-loaded base (the real SmolLM2 GGUF file: slow)."""

from __future__ import annotations

import pytest
import torch

import hf_encore
from hf_encore import EncoreConfig, get_encore_model
from hf_encore.layer import Linear
from hf_encore.loading import load_model

from tiny_models import TINY_LAYERS

SMALL = dict(method="encore", layers=list(TINY_LAYERS), stats_n_tokens=2048, v_num_grad_steps=4,
             n_context_templates=2)
SPORTS = [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}]
CITIES = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}]


def logits(model, tokenizer, text="LeBron James plays the sport of"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


@pytest.fixture
def tokenizer(tiny_tok):
    """The tiny byte-level BPE tokenizer of tiny_models.py (not the real model's)."""
    return tiny_tok


@pytest.fixture
def two_teams(tiny_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path / "cache"))
    model = get_encore_model(load_model(str(tiny_dir))[0], EncoreConfig(**SMALL), adapter_name="sports",
                             tokenizer=tokenizer, corpus=tiny_dir / "corpus.txt")
    model.add_adapter("cities", EncoreConfig(**SMALL))
    model.edit(SPORTS, adapter_name="sports", progress=False)
    with pytest.raises(ValueError, match="not active"):
        model.edit(CITIES, adapter_name="cities", progress=False)
    model.set_adapter("cities")
    model.edit(CITIES, progress=False)
    return model


def test_switch_disable_combine_delete(two_teams, tokenizer):
    model = two_teams
    with model.disable_adapter():
        base = logits(model, tokenizer)
    model.set_adapter("sports")
    sports = logits(model, tokenizer)
    model.set_adapter("cities")
    cities = logits(model, tokenizer)
    assert not torch.equal(sports, base) and not torch.equal(cities, base) and not torch.equal(sports, cities)
    assert model.base_model.edit_states["sports"].num_edits == 1
    assert model.base_model.edit_states["cities"].ledger[0]["requests"][0]["target_new"] == "Rome"

    model.base_model.set_adapter(["sports", "cities"])  # both active: their deltas add up
    both = logits(model, tokenizer)
    with pytest.raises(ValueError, match="Several adapters are active"):
        model.edit(SPORTS, progress=False)
    model.base_model.combine_adapters(["sports", "cities"], "both")
    model.set_adapter("both")
    torch.testing.assert_close(logits(model, tokenizer), both, rtol=1e-4, atol=1e-4)  # (a+b)x vs ax+bx
    combined = model.base_model.edit_states["both"]
    assert combined.num_edits == 2 and [e["source_adapter"] for e in combined.ledger] == ["sports", "cities"]
    for layer in TINY_LAYERS:
        expected = (model.base_model.edit_states["sports"].prev_key_moments[layer]
                    + model.base_model.edit_states["cities"].prev_key_moments[layer])
        assert torch.equal(combined.prev_key_moments[layer], expected)

    model.delete_adapter("sports")
    assert "sports" not in model.peft_config and "sports" not in model.base_model.edit_states
    assert all("sports" not in m.encore_delta for m in model.modules() if isinstance(m, Linear))
    model.set_adapter("cities")
    torch.testing.assert_close(logits(model, tokenizer), cities, rtol=0, atol=0)


def test_save_and_load_several_adapters_with_their_states(two_teams, tiny_dir, tokenizer, tmp_path):
    model = two_teams
    model.save_pretrained(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "sports" / "encore_state.json").is_file()
    assert (tmp_path / "adapters" / "cities" / "encore_ledger.jsonl").is_file()
    expected = {}
    for name in ("sports", "cities"):
        model.set_adapter(name)
        expected[name] = logits(model, tokenizer)

    loaded = hf_encore.from_pretrained(load_model(str(tiny_dir))[0], tmp_path / "adapters" / "sports",
                                       adapter_name="sports", tokenizer=tokenizer)
    loaded.load_adapter(tmp_path / "adapters" / "cities", adapter_name="cities")
    for name in ("sports", "cities"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded, tokenizer), expected[name], rtol=0, atol=0)
        assert loaded.base_model.edit_states[name].num_batches == 1


def test_merge_several_unmerge_exactly(two_teams, tokenizer):
    model = two_teams
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.base_model.set_adapter(["sports", "cities"])
    both = logits(model, tokenizer)
    model.merge_adapter(["sports", "cities"])
    torch.testing.assert_close(logits(model, tokenizer), both, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="merged"):
        model.edit(SPORTS, adapter_name="sports", progress=False)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in original:
            assert torch.equal(param, original[name]), name


@pytest.mark.slow
def test_gguf_base_records_its_file_loads_back_and_saves_merged(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from hf_encore.loading import builtin_gguf

    gguf = builtin_gguf("smollm2-135m")
    base, gguf_tokenizer = load_model(str(gguf))
    model = get_encore_model(base, EncoreConfig(**{**SMALL, "layers": [3, 4]}), tokenizer=gguf_tokenizer)
    assert model.peft_config["default"].gguf_file == gguf.name
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, Linear):
            module.encore_delta["default"].data = torch.randn(module.encore_delta["default"].shape, generator=g) * .01
    expected = logits(model, gguf_tokenizer)
    model.save_pretrained(tmp_path / "adapter")

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", gguf_file=gguf.name)
    torch.testing.assert_close(logits(auto, gguf_tokenizer), expected, rtol=0, atol=0)
    ours = hf_encore.from_pretrained(None, tmp_path / "adapter")  # base (and its GGUF file) from the adapter config
    torch.testing.assert_close(logits(ours, gguf_tokenizer), expected, rtol=0, atol=0)

    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    gguf_tokenizer.save_pretrained(tmp_path / "merged")
    reloaded = load_model(str(tmp_path / "merged"))[0]
    torch.testing.assert_close(logits(reloaded, gguf_tokenizer), expected, rtol=1e-4, atol=1e-4)
