"""Adapter lifecycle: save and load with the editing state, exact resume in a fresh process, fingerprint check,
damaged files, atomic saves, no pickle, and an adapter without its state.

On the tiny random Llama of tiny_models.py, saved as a model directory (``tiny_dir``) so that every loader, PEFT's
and transformers' included, finds its base: none of these properties depends on what the model knows."""

from __future__ import annotations

import contextlib
import copy
import json
import os
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
    AdapterFileError,
    BaseModelMismatchError,
    EditStateMissingError,
    EncoreConfig,
    get_encore_model,
)
from hf_encore.loading import load_model

from tiny_models import TINY_D_K, TINY_LAYERS

# Small settings: the properties under test do not depend on how well the facts are written.
SMALL = dict(method="encore", layers=list(TINY_LAYERS), stats_n_tokens=2048, v_num_grad_steps=4,
             n_context_templates=2)
BATCHES = [
    [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}],
    [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}],
    [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}],
    [{"prompt": "{} is a product of", "subject": "Toyota Camry", "target_new": "Apple"}],
]
PROBE = "LeBron James plays the sport of"


def logits(model, tokenizer, text=PROBE):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def deltas(model, adapter="default"):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f"encore_delta.{adapter}" in n}


@pytest.fixture
def tiny_corpus(tiny_dir):
    return tiny_dir / "corpus.txt"


def edit_first_batch(tiny_dir, tokenizer):
    """The tiny base loaded from its directory (as a fresh process loads it), with BATCHES[0] edited into it."""
    base = load_model(str(tiny_dir))[0]
    model = get_encore_model(base, EncoreConfig(**SMALL), tokenizer=tokenizer, corpus=tiny_dir / "corpus.txt")
    model.edit(BATCHES[0], progress=False)
    return model


@pytest.fixture(scope="module")
def edited_once(tiny_dir, tiny_tok, tmp_path_factory):
    """One batch edited into the tiny base, once per module, with statistics in the module's own cache (no C₀ from
    another module is picked up): (model, cache directory)."""
    cache = tmp_path_factory.mktemp("stats-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENCORE_CACHE", str(cache))
        return edit_first_batch(tiny_dir, tiny_tok), cache


@pytest.fixture
def edited(edited_once, monkeypatch):
    """A copy of that edited model for the test to change; the statistics cache is the module's."""
    model, cache = edited_once
    monkeypatch.setenv("HF_ENCORE_CACHE", str(cache))
    return copy.deepcopy(model)


def test_save_writes_state_and_every_loader_gives_identical_logits(edited, tiny_dir, tiny_tok, tmp_path):
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

    expected = logits(edited, tiny_tok)
    ours = hf_encore.from_pretrained(load_model(str(tiny_dir))[0], out, tokenizer=tiny_tok)
    plain = PeftModel.from_pretrained(load_model(str(tiny_dir))[0], out)
    auto = AutoPeftModelForCausalLM.from_pretrained(out)
    transformers_base = load_model(str(tiny_dir))[0]
    transformers_base.load_adapter(str(out))
    for loaded in (ours, plain, auto, transformers_base):
        torch.testing.assert_close(logits(loaded, tiny_tok), expected, rtol=0, atol=0)

    state, saved = ours.base_model.edit_states["default"], edited.base_model.edit_states["default"]
    assert state.context_templates == saved.context_templates
    assert state.num_edits == saved.num_edits == 1 and state.ledger == json.loads(json.dumps(saved.ledger))
    for layer, moment in saved.prev_key_moments.items():
        assert state.prev_key_moments[layer].dtype == torch.float64
        assert torch.equal(state.prev_key_moments[layer], moment)


@pytest.mark.slow  # two fresh interpreters: 14 s
def test_resume_in_a_fresh_process_is_bit_identical(tiny_dir, tiny_tok, tiny_corpus, tmp_path, stats_cache):
    # Not a copy of the module's model: a copy's tensors sit elsewhere in memory than those of a base loaded from
    # its directory, which changes float32 rounding (3e-8 here). This process and the next load the base alike.
    edited = edit_first_batch(tiny_dir, tiny_tok)
    edited.edit(BATCHES[1], progress=False)
    edited.save_pretrained(tmp_path / "after2")
    for batch in BATCHES[2:]:
        edited.edit(batch, progress=False)
    one_go = deltas(edited)

    script = textwrap.dedent(f"""
        import torch, hf_encore
        from hf_encore.loading import load_model
        base, tok = load_model({str(tiny_dir)!r})
        model = hf_encore.from_pretrained(base, {str(tmp_path / 'after2')!r}, tokenizer=tok,
                                          corpus={str(tiny_corpus)!r})
        for batch in {BATCHES[2:]!r}:
            model.edit(batch, progress=False)
        model.save_pretrained({str(tmp_path / 'after4')!r})
    """)
    # The same number of threads as here: the float32 sums must be the same ones.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}  # stats_cache too
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_file(str(tmp_path / "after4" / "adapter_model.safetensors"))
    assert len(resumed) == len(one_go) == 2
    for name, value in one_go.items():
        key = name.replace(".default", "")
        assert torch.equal(resumed[key], value), f"{key}: max |Δ| {float((resumed[key] - value).abs().max())}"
    ledger = (tmp_path / "after4" / "encore_ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["batch"] for line in ledger] == [1, 2, 3, 4]


def test_statistics_travel_with_the_adapter_when_asked(edited, tiny_dir, tiny_tok, tmp_path, monkeypatch):
    edited.save_pretrained(tmp_path / "with_stats", save_statistics=True)
    edited.save_pretrained(tmp_path / "without")
    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path / "empty-cache"))  # another machine: no cache, no corpus
    moved = hf_encore.from_pretrained(load_model(str(tiny_dir))[0], tmp_path / "with_stats", tokenizer=tiny_tok)
    moved.edit(BATCHES[1], progress=False)
    assert moved.base_model.edit_states["default"].num_batches == 2
    stranded = hf_encore.from_pretrained(load_model(str(tiny_dir))[0], tmp_path / "without", tokenizer=tiny_tok)
    with pytest.raises(FileNotFoundError, match="save_statistics=True"):
        stranded.edit(BATCHES[1], progress=False)


def test_a_resumed_adapter_keeps_the_statistics_budget_it_was_edited_with(edited, tiny_dir, tiny_tok, tmp_path):
    """Defaults change between releases: an adapter that leaves stats_n_tokens to the default and continues without
    a corpus uses the C₀ its earlier edits recorded, not one of today's default size (which no cache holds)."""
    edited.save_pretrained(tmp_path / "adapter", save_statistics=True)
    moved = hf_encore.from_pretrained(load_model(str(tiny_dir))[0], tmp_path / "adapter", tokenizer=tiny_tok)
    moved.peft_config["default"].stats_n_tokens = None  # as an adapter saved before the budget was set explicitly
    moved.edit(BATCHES[1], progress=False)
    state = moved.base_model.edit_states["default"]
    assert state.num_batches == 2
    assert {ref["n_tokens"] for ref in state.stats_refs.values()} == {SMALL["stats_n_tokens"]}


def test_other_base_weights_are_refused_unless_overridden(edited, tiny_dir, tiny_tok, tmp_path):
    edited.save_pretrained(tmp_path / "adapter")
    other = load_model(str(tiny_dir))[0]
    with torch.no_grad():
        other.model.layers[TINY_LAYERS[-1]].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(BaseModelMismatchError, match="ignore_base_mismatch=True"):
        hf_encore.from_pretrained(other, tmp_path / "adapter")
    with pytest.raises(BaseModelMismatchError):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    loaded = hf_encore.from_pretrained(other, tmp_path / "adapter", ignore_base_mismatch=True)
    # The override is not written back: the recorded fingerprint is still that of the original base.
    assert loaded.peft_config["default"].base_model_fingerprint == edited.peft_config["default"].base_model_fingerprint
    # Weights outside the edited layers matter too (keys and targets were computed through all of them), and the
    # error names the part that differs.
    above = load_model(str(tiny_dir))[0]
    with torch.no_grad():
        above.model.layers[3].mlp.down_proj.weight[0, 0] += 1e-3  # above the edited layers 1 and 2
    parts = len(edited.peft_config["default"].base_model_parts_fingerprint)  # each block and each other module
    with pytest.raises(BaseModelMismatchError, match=rf"these parts differ: model.layers.3 \(1 of {parts}\)"):
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
def test_damaged_files_are_named(edited, tiny_dir, tmp_path, damage, file):
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
        hf_encore.from_pretrained(load_model(str(tiny_dir))[0], out)


def test_plain_peft_adapter_file_damage_is_named_too(edited, tiny_dir, tmp_path):
    out = tmp_path / "adapter"
    edited.save_pretrained(out, save_editing_state=False)
    assert not (out / "encore_state.json").exists()
    path = out / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        hf_encore.from_pretrained(load_model(str(tiny_dir))[0], out)


def test_interrupted_save_leaves_the_previous_save_intact(edited, tiny_dir, tiny_tok, tmp_path, monkeypatch):
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directory left
    monkeypatch.undo()
    edited.save_pretrained(out)
    assert (out / "NOTES.txt").read_text() == "mine"  # a user's own file survives a save
    reloaded = hf_encore.from_pretrained(load_model(str(tiny_dir))[0], out, tokenizer=tiny_tok)
    assert reloaded.base_model.edit_states["default"].num_batches == 2


# What the process does while an adapter loads, seen through CPython's audit hooks: "pickle.find_class" is raised
# whenever an unpickler of the pickle module (C or Python, torch.load(weights_only=False) included) resolves a
# global; "open" whenever Python opens a file (torch's weights-only unpickler raises no event of its own, but
# torch.load opens its file). A hook cannot be removed: it is installed once per process and records only while on.
AUDIT: dict = {"installed": False, "on": False, "events": []}


def _audit_hook(event: str, args: tuple) -> None:
    if AUDIT["on"] and event in ("pickle.find_class", "open"):
        AUDIT["events"].append((event, args))


@contextlib.contextmanager
def audited():
    """Record the "pickle.find_class" and "open" audit events raised inside the block (a list, filled as it runs)."""
    if not AUDIT["installed"]:
        sys.addaudithook(_audit_hook)
        AUDIT["installed"] = True
    events: list = []
    AUDIT["events"], AUDIT["on"] = events, True
    try:
        yield events
    finally:
        AUDIT["on"] = False


def pickled_files(events, root) -> list:
    """Files under ``root`` opened in ``events`` that hold a pickle (protocol 2+) or a torch.save zip archive."""
    found = []
    for event, args in events:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(os.path.realpath(root) + os.sep) and os.path.isfile(path):
                with open(path, "rb") as f:
                    if f.read(4).startswith((b"\x80", b"PK\x03\x04")):
                        found.append(path)
    return found


def test_loading_never_unpickles(edited, tiny_dir, tmp_path):
    edited.save_pretrained(tmp_path / "adapter", save_statistics=True)
    base = load_model(str(tiny_dir))[0]
    with audited() as events:
        hf_encore.from_pretrained(base, tmp_path / "adapter")
    assert [args for event, args in events if event == "pickle.find_class"] == []
    assert pickled_files(events, tmp_path / "adapter") == []
    assert any(event == "open" for event, _ in events)  # the hook saw the load's own reads (JSON files)


def test_adapter_without_state_asks_before_editing(edited, tiny_dir, tiny_tok, tmp_path):
    edited.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(load_model(str(tiny_dir))[0], tmp_path / "adapter")
    plain.base_model.__dict__["tokenizer"] = tiny_tok
    before = deltas(plain)
    with pytest.raises(EditStateMissingError, match="start_new_memory=True"):
        plain.edit(BATCHES[1], progress=False)
    assert all(torch.equal(v, deltas(plain)[k]) for k, v in before.items())


def tensor_bytes(path) -> int:
    """The tensor data of a safetensors file: its size less the 8-byte length and the JSON header."""
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def test_bf16_deltas_halve_the_file_and_load(edited, tiny_dir, tiny_tok, tmp_path):
    edited.save_pretrained(tmp_path / "fp32")
    edited.save_pretrained(tmp_path / "bf16", delta_dtype="bfloat16")
    # The tiny deltas are small beside the file's header: compare the tensor data itself (exactly half).
    size32 = tensor_bytes(tmp_path / "fp32" / "adapter_model.safetensors")
    size16 = tensor_bytes(tmp_path / "bf16" / "adapter_model.safetensors")
    assert size32 == len(TINY_LAYERS) * edited.base_model.model.config.hidden_size * TINY_D_K * 4  # float32 deltas
    assert 2 * size16 == size32
    loaded = hf_encore.from_pretrained(load_model(str(tiny_dir))[0], tmp_path / "bf16", tokenizer=tiny_tok)
    for name, value in deltas(edited).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name].data, value, rtol=1e-2, atol=1e-4)


def test_push_to_a_fake_hub_and_load_back_offline(edited, tiny_dir, tiny_tok, tmp_path, monkeypatch):
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
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.library_name == "peft" and "knowledge-editing" in data.tags
    assert data.eval_results[0].metric_type == "efficacy" and data.eval_results[0].metric_value == 1.0
    assert "| efficacy | 1.000 |" in card and "| football |" in card and "1 facts written" in card

    # The download side: a Hub cache as a download leaves it, read with the Hub offline.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    hub.seed_cache("team/sports-edits", tmp_path / "hub-cache")
    loaded = hf_encore.from_pretrained(load_model(str(tiny_dir))[0], "team/sports-edits", tokenizer=tiny_tok,
                                       cache_dir=str(tmp_path / "hub-cache"))
    torch.testing.assert_close(logits(loaded, tiny_tok), logits(edited, tiny_tok), rtol=0, atol=0)
    assert loaded.base_model.edit_states["default"].num_edits == 1
