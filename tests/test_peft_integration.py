"""The Encore method as PEFT sees it: get_peft_model, save/load, AutoPeftModelForCausalLM, merge/unmerge."""

from __future__ import annotations

import json

import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model

from hf_encore import EncoreConfig, EncoreModel, get_encore_model
from hf_encore.layer import Linear


def randomise_deltas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, Linear):
            for delta in module.encore_delta.values():
                delta.data = torch.randn(delta.shape, generator=g) * 0.01


def logits(model, tokenizer, text="The Eiffel Tower is located in the city of"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_get_peft_model_targets_exactly_the_edited_layers(smollm2, tokenizer):
    model = get_peft_model(smollm2, EncoreConfig(method="memit", layers=[3, 4]))
    assert isinstance(model, PeftModel) and isinstance(model.base_model, EncoreModel)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, Linear))
    assert wrapped == ["base_model.model.model.layers.3.mlp.down_proj", "base_model.model.model.layers.4.mlp.down_proj"]
    assert callable(model.edit)  # PeftModel forwards to the tuner
    assert all(not p.requires_grad for p in model.parameters())


def test_default_layers_and_fingerprint(smollm2, tokenizer):
    model = get_encore_model(smollm2, tokenizer=tokenizer)
    config = model.peft_config["default"]
    assert config.layers == [4, 5, 6, 7, 8] and config.method == "encore"
    assert isinstance(config.base_model_fingerprint, str) and len(config.base_model_fingerprint) == 32


def test_save_and_load_round_trip(smollm2, smollm2_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = get_encore_model(smollm2, EncoreConfig(method="encore"), tokenizer=tokenizer)
    randomise_deltas(model)
    expected = logits(model, tokenizer)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ENCORE" and saved["method"] == "encore" and saved["layers"] == [4, 5, 6, 7, 8]
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert isinstance(PeftConfig.from_pretrained(tmp_path), EncoreConfig)

    from hf_encore.loading import load_model

    fresh = load_model(str(smollm2_dir))[0]
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits(loaded, tokenizer), expected, rtol=0, atol=0)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(auto, tokenizer), expected, rtol=0, atol=0)


def test_merge_unmerge_is_exact_and_merge_and_unload_gives_plain_model(smollm2, tokenizer):
    model = get_encore_model(smollm2, tokenizer=tokenizer)
    randomise_deltas(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapted = logits(model, tokenizer)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, tokenizer), adapted, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in original:
            assert torch.equal(param, original[name]), name
    plain = model.merge_and_unload()
    assert not any(isinstance(m, Linear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, tokenizer), adapted, rtol=1e-4, atol=1e-4)
