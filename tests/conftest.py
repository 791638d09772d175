"""Shared fixtures: the real SmolLM2-135M (fetched and cached once by hf_encore itself) and the shared data."""

from __future__ import annotations

import logging
import os

# There is no Hub here: huggingface_hub reads this at import time, so set it before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path

import pytest
import torch

from hf_encore.data import data_dir

torch.set_num_threads(max(1, torch.get_num_threads()))
logging.getLogger("hf_encore").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = data_dir()
    if not (path / "counterfact" / "counterfact-edit.json").is_file():
        pytest.skip(f"shared data not found at {path} (set HF_ENCORE_DATA)")
    return path


@pytest.fixture(scope="session")
def corpus_path(shared_data) -> Path:
    return shared_data / "corpus" / "wikitext-2-valid.txt"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from hf_encore.loading import ensure_builtin

    return ensure_builtin("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from hf_encore.loading import load_model

    return load_model(str(smollm2_dir))[1]


@pytest.fixture
def smollm2(smollm2_dir):
    """A fresh copy of the model for each test (loading the converted copy takes well under a second)."""
    from hf_encore.loading import load_model

    return load_model(str(smollm2_dir))[0]


@pytest.fixture(scope="session")
def cases(shared_data):
    from hf_encore.data import load_counterfact

    return load_counterfact(shared_data / "counterfact" / "counterfact-edit.json")


# Property-based tests: random examples while developing, a fixed sequence in CI (a red CI must be reproducible).
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")
