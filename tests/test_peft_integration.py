"""The Encore method as PEFT sees it: get_peft_model, save/load, AutoPeftModelForCausalLM, merge/unmerge (tiny random
Llamas: tiny_models.py)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model

from hf_encore import EditReport, EncoreConfig, EncoreModel, EncorePeftModel, get_encore_model
from hf_encore.architectures import default_layers
from hf_encore.layer import Linear

from tiny_models import TINY_CORPUS, TINY_EDIT, TINY_LAYERS, deltas, tiny_editable, tiny_llama

REQUEST = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}


def randomise_deltas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, Linear):
            for delta in module.encore_delta.values():
                delta.data = torch.randn(delta.shape, generator=g) * 0.01


def logits(model, tokenizer, text="The Eiffel Tower is located in the city of"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_get_peft_model_targets_exactly_the_edited_layers(tiny_tok):
    model = get_peft_model(tiny_llama(0), EncoreConfig(method="memit", layers=list(TINY_LAYERS)))
    assert isinstance(model, PeftModel) and isinstance(model.base_model, EncoreModel)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, Linear))
    assert wrapped == ["base_model.model.model.layers.1.mlp.down_proj", "base_model.model.model.layers.2.mlp.down_proj"]
    assert all(not p.requires_grad for p in model.parameters())
    # PEFT's own PeftModel forwards edit() to the tuner: a real edit through it changes both deltas.
    before = deltas(model)
    report = model.edit([REQUEST], tokenizer=tiny_tok, corpus=TINY_CORPUS, progress=False, **TINY_EDIT)
    assert isinstance(report, EditReport) and [r.subject for r in report.requests] == ["LeBron James"]
    assert all(not torch.equal(deltas(model)[k], v) for k, v in before.items())


def test_edit_is_a_method_of_encore_peft_model_and_edits_the_adapter():
    assert "edit" in vars(EncorePeftModel)  # defined on the class itself, not reached through attribute forwarding
    model = tiny_editable()
    assert type(model) is EncorePeftModel
    before = deltas(model)
    report = EncorePeftModel.edit(model, [REQUEST], progress=False)
    assert isinstance(report, EditReport) and report.method == "memit" and len(report.requests) == 1
    assert [layer.layer for layer in report.layers] == list(TINY_LAYERS)
    after = deltas(model)
    assert after.keys() == before.keys() and all(not torch.equal(after[k], before[k]) for k in before)
    for layer in report.layers:  # the report's figures are those of the deltas now in the adapter
        name = f"base_model.model.model.layers.{layer.layer}.mlp.down_proj"
        assert float(after[name].double().norm()) == pytest.approx(layer.delta_norm, rel=1e-5)
    assert model.base_model.edit_states["default"].num_edits == 1


def test_default_layers_and_fingerprint():
    # 30 blocks, as SmolLM2-135M: not in the published table, so the default band.
    model = get_encore_model(tiny_llama(0, num_layers=30))
    config = model.peft_config["default"]
    assert config.layers == list(default_layers(30)) == [4, 5, 6, 7, 8] and config.method == "encore"
    assert isinstance(config.base_model_fingerprint, str) and len(config.base_model_fingerprint) == 32
    other = get_encore_model(tiny_llama(1, num_layers=30)).peft_config["default"].base_model_fingerprint
    assert other != config.base_model_fingerprint  # other weights, another fingerprint


def test_save_and_load_round_trip(tiny_dir, tiny_tok, tmp_path, monkeypatch):
    from hf_encore.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = tiny_tok
    model = get_encore_model(load_model(str(tiny_dir))[0], EncoreConfig(method="encore"), tokenizer=tokenizer)
    randomise_deltas(model)
    expected = logits(model, tokenizer)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ENCORE" and saved["method"] == "encore" and saved["layers"] == [0, 1, 2, 3]
    assert saved["base_model_name_or_path"] == str(tiny_dir)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert isinstance(PeftConfig.from_pretrained(tmp_path), EncoreConfig)

    fresh = load_model(str(tiny_dir))[0]
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits(loaded, tokenizer), expected, rtol=0, atol=0)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(auto, tokenizer), expected, rtol=0, atol=0)


def test_merge_unmerge_is_exact_and_merge_and_unload_gives_plain_model(tiny_tok):
    tokenizer = tiny_tok
    model = get_encore_model(tiny_llama(0), tokenizer=tokenizer)
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
