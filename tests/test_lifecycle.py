"""Adapter lifecycle: save and load with the editing state, exact resume in a fresh process, fingerprint check,
damaged files, atomic saves, no pickle, and an adapter without its state."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file

import hf_encore
import hf_encore.peft_model as peft_model_module
from hf_encore import (
    AdapterFileError, BaseModelMismatchError, EditStateMissingError, EncoreConfig, get_encore_model,
)
from hf_encore.loading import load_model

# Small settings: the properties under test do not depend on how well the facts are written.
SMALL = dict(method="encore", layers=[3, 4], stats_n_tokens=2048, v_num_grad_steps=4, n_context_templates=2)
BATCHES = [
    [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}],
    [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}],
    [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}],
    [{"prompt": "{} is a product of", "subject": "Toyota Camry", "target_new": "Apple"}],
]
PROBE = "LeBron James plays the sport of"


@pytest.fixture
def stats_cache(tmp_path, monkeypatch):
    """Statistics cache private to the test (the resume test must not pick up C₀ from another test)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("HF_ENCORE_CACHE", str(path))
    return path


def logits(model, tokenizer, text=PROBE):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def deltas(model, adapter="default"):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f"encore_delta.{adapter}" in n}


@pytest.fixture
def edited(smollm2, tokenizer, corpus_path, stats_cache):
    model = get_encore_model(smollm2, EncoreConfig(**SMALL), tokenizer=tokenizer, corpus=corpus_path)
    model.edit(BATCHES[0], progress=False)
    return model


def test_save_writes_state_and_every_loader_gives_identical_logits(edited, smollm2_dir, tokenizer, tmp_path):
    out = tmp_path / "adapter"
    edited.save_pretrained(out)
    assert sorted(os.listdir(out)) == [".encore.lock", "README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "encore_ledger.jsonl", "encore_manifest.json", "encore_state.json",
                                       "encore_state.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert "ledger" not in config and "context_templates" not in config  # growing state is kept out of the config
    ledger = [json.loads(line) for line in (out / "encore_ledger.jsonl").read_text().splitlines()]
    assert ledger[0]["batch"] == 1 and ledger[0]["method"] == "encore"
    assert ledger[0]["requests"][0]["subject"] == "LeBron James" and "report" in ledger[0]
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "LeBron James plays the sport of" in card

    expected = logits(edited, tokenizer)
    ours = hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], out, tokenizer=tokenizer)
    plain = PeftModel.from_pretrained(load_model(str(smollm2_dir))[0], out)
    auto = AutoPeftModelForCausalLM.from_pretrained(out)
    transformers_base = load_model(str(smollm2_dir))[0]
    transformers_base.load_adapter(str(out))
    for loaded in (ours, plain, auto, transformers_base):
        torch.testing.assert_close(logits(loaded, tokenizer), expected, rtol=0, atol=0)

    state, saved = ours.base_model.edit_states["default"], edited.base_model.edit_states["default"]
    assert state.context_templates == saved.context_templates
    assert state.num_edits == saved.num_edits == 1 and state.ledger == json.loads(json.dumps(saved.ledger))
    for layer, moment in saved.prev_key_moments.items():
        assert state.prev_key_moments[layer].dtype == torch.float64
        assert torch.equal(state.prev_key_moments[layer], moment)


def test_resume_in_a_fresh_process_is_bit_identical(edited, smollm2_dir, tokenizer, corpus_path, tmp_path,
                                                   stats_cache):
    edited.edit(BATCHES[1], progress=False)
    edited.save_pretrained(tmp_path / "after2")
    for batch in BATCHES[2:]:
        edited.edit(batch, progress=False)
    one_go = deltas(edited)

    script = textwrap.dedent(f"""
        import torch, hf_encore
        from hf_encore.loading import load_model
        base, tok = load_model({str(smollm2_dir)!r})
        model = hf_encore.from_pretrained(base, {str(tmp_path / 'after2')!r}, tokenizer=tok, corpus={str(corpus_path)!r})
        for batch in {BATCHES[2:]!r}:
            model.edit(batch, progress=False)
        model.save_pretrained({str(tmp_path / 'after4')!r})
    """)
    env = {**os.environ, "HF_ENCORE_CACHE": str(stats_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_file(str(tmp_path / "after4" / "adapter_model.safetensors"))
    assert len(resumed) == len(one_go) == 2
    for name, value in one_go.items():
        key = name.replace(".default", "")
        assert torch.equal(resumed[key], value), f"{key}: max |Δ| {float((resumed[key] - value).abs().max())}"
    ledger = (tmp_path / "after4" / "encore_ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["batch"] for line in ledger] == [1, 2, 3, 4]


def test_statistics_travel_with_the_adapter_when_asked(edited, smollm2_dir, tokenizer, tmp_path, monkeypatch):
    edited.save_pretrained(tmp_path / "with_stats", save_statistics=True)
    edited.save_pretrained(tmp_path / "without")
    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path / "empty-cache"))  # another machine: no cache, no corpus
    moved = hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], tmp_path / "with_stats", tokenizer=tokenizer)
    moved.edit(BATCHES[1], progress=False)
    assert moved.base_model.edit_states["default"].num_batches == 2
    stranded = hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], tmp_path / "without", tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="save_statistics=True"):
        stranded.edit(BATCHES[1], progress=False)


def test_other_base_weights_are_refused_unless_overridden(edited, smollm2_dir, tokenizer, tmp_path):
    edited.save_pretrained(tmp_path / "adapter")
    other = load_model(str(smollm2_dir))[0]
    with torch.no_grad():
        other.model.layers[4].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(BaseModelMismatchError, match="ignore_base_mismatch=True"):
        hf_encore.from_pretrained(other, tmp_path / "adapter")
    with pytest.raises(BaseModelMismatchError):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    loaded = hf_encore.from_pretrained(other, tmp_path / "adapter", ignore_base_mismatch=True)
    # The override is not written back: the recorded fingerprint is still that of the original base.
    assert loaded.peft_config["default"].base_model_fingerprint == edited.peft_config["default"].base_model_fingerprint
    # Weights outside the edited layers matter too (keys and targets were computed through all of them), and the
    # error names the part that differs.
    above = load_model(str(smollm2_dir))[0]
    with torch.no_grad():
        above.model.layers[10].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(BaseModelMismatchError, match=r"these parts differ: model.layers.10 \(1 of 33\)"):
        hf_encore.from_pretrained(above, tmp_path / "adapter")


@pytest.mark.parametrize("damage,file", [
    ("truncate", "adapter_model.safetensors"),
    ("flip", "adapter_model.safetensors"),
    ("flip", "encore_state.safetensors"),
    ("truncate", "encore_ledger.jsonl"),
    ("truncate", "encore_state.json"),
    ("truncate", "adapter_config.json"),
    ("delete", "encore_state.safetensors"),
])
def test_damaged_files_are_named(edited, smollm2_dir, tmp_path, damage, file):
    out = tmp_path / "adapter"
    edited.save_pretrained(out)
    path = out / file
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        path.unlink()
    with pytest.raises(AdapterFileError, match=file.replace(".", r"\.")):
        hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], out)


def test_plain_peft_adapter_file_damage_is_named_too(edited, smollm2_dir, tmp_path):
    out = tmp_path / "adapter"
    edited.save_pretrained(out, save_editing_state=False)
    assert not (out / "encore_state.json").exists()
    path = out / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], out)


def test_interrupted_save_leaves_the_previous_save_intact(edited, smollm2_dir, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    edited.save_pretrained(out)
    (out / "NOTES.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    edited.edit(BATCHES[1], progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(peft_model_module, "write_edit_state", crash)
    with pytest.raises(KeyboardInterrupt):
        edited.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "cache"]  # no staging directory left
    monkeypatch.undo()
    edited.save_pretrained(out)
    assert (out / "NOTES.txt").read_text() == "mine"  # a user's own file survives a save
    reloaded = hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], out, tokenizer=tokenizer)
    assert reloaded.base_model.edit_states["default"].num_batches == 2


def test_loading_never_unpickles(edited, smollm2_dir, tmp_path, monkeypatch):
    edited.save_pretrained(tmp_path / "adapter")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading an adapter")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], tmp_path / "adapter")


def test_adapter_without_state_asks_before_editing(edited, smollm2_dir, tokenizer, tmp_path):
    edited.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(load_model(str(smollm2_dir))[0], tmp_path / "adapter")
    plain.base_model.__dict__["tokenizer"] = tokenizer
    before = deltas(plain)
    with pytest.raises(EditStateMissingError, match="start_new_memory=True"):
        plain.edit(BATCHES[1], progress=False)
    assert all(torch.equal(v, deltas(plain)[k]) for k, v in before.items())


def test_bf16_deltas_halve_the_file_and_load(edited, smollm2_dir, tokenizer, tmp_path):
    edited.save_pretrained(tmp_path / "fp32")
    edited.save_pretrained(tmp_path / "bf16", delta_dtype="bfloat16")
    size32 = (tmp_path / "fp32" / "adapter_model.safetensors").stat().st_size
    size16 = (tmp_path / "bf16" / "adapter_model.safetensors").stat().st_size
    assert size16 < 0.51 * size32
    loaded = hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], tmp_path / "bf16", tokenizer=tokenizer)
    for name, value in deltas(edited).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name].data, value, rtol=1e-2, atol=1e-4)


def test_push_to_a_fake_hub_and_load_back_offline(edited, smollm2_dir, tokenizer, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from fake_hub import FakeHub

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as hub:
        info = hf_encore.push_to_hub(edited, "team/sports-edits", endpoint=hub.endpoint, token="hf_dummy",
                                     private=True, metrics={"efficacy": 1.0})
        assert not hub.unknown, hub.unknown
    files = hub.repos["team/sports-edits"]
    assert hub.private["team/sports-edits"] and info.oid == hub.commits["team/sports-edits"]
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "encore_ledger.jsonl",
                          "encore_manifest.json", "encore_state.json", "encore_state.safetensors"}
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: peft\n") and "- knowledge-editing" in card
    assert "| efficacy | 1.000 |" in card and "| football |" in card and "1 facts written" in card

    # The download side: a Hub cache as a download leaves it, read with the Hub offline.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    hub.seed_cache("team/sports-edits", tmp_path / "hub-cache")
    loaded = hf_encore.from_pretrained(load_model(str(smollm2_dir))[0], "team/sports-edits", tokenizer=tokenizer,
                                       cache_dir=str(tmp_path / "hub-cache"))
    torch.testing.assert_close(logits(loaded, tokenizer), logits(edited, tokenizer), rtol=0, atol=0)
    assert loaded.base_model.edit_states["default"].num_edits == 1
