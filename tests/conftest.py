"""Shared fixtures: the tiny random model, its tokenizer and corpus (tests/tiny_models.py: every test that needs no
real knowledge); the real SmolLM2-135M (fetched and cached once by hf_encore itself) and the shared data.

A test that uses the real model (``smollm2``, ``smollm2_dir``, ``tokenizer``) must be marked ``slow``
(``make test-fast`` runs the rest): collection stops with the list of those that are not.
"""

from __future__ import annotations

import logging
import os

# There is no Hub here: huggingface_hub reads this at import time, so set it before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path

import pytest
import torch

from hf_encore.data import data_dir

ALL_THREADS = max(1, torch.get_num_threads())
logging.getLogger("hf_encore").setLevel(logging.WARNING)


REAL_MODEL_FIXTURES = {"smollm2", "smollm2_dir", "tokenizer"}


def uses_the_real_model(item) -> bool:
    """Whether the test requests one of this file's real-model fixtures (directly or through other fixtures; a test
    module may define its own ``tokenizer``, e.g. the tiny one)."""
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(definitions.get(name) and definitions[name][-1].func.__module__ == __name__
               for name in REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items if uses_the_real_model(item) and not item.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError("these tests load the real model but are not marked slow:\n  " + "\n  ".join(unmarked))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tests that are not slow run on tiny models, whose operations are too small for a thread pool: one thread is
    faster, and much faster on a busy machine (a tiny edit: 0.2 s against 5 s with two threads beside another job).
    The slow tests, on the real model, get every thread. Set before the test's fixtures, module-scoped ones too."""
    torch.set_num_threads(ALL_THREADS if item.get_closest_marker("slow") else 1)


@pytest.fixture(scope="session")
def tiny_tok():
    """The tiny byte-level BPE tokenizer (tiny_models.tiny_tokenizer); tests must not change it."""
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """``tiny_llama(0)`` and the tiny tokenizer saved as a model directory (for ``load_model``, the CLI's ``--model``,
    ``AutoPeftModelForCausalLM``), with ``corpus.txt`` (TINY_CORPUS) beside them."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture
def stats_cache(tmp_path, monkeypatch) -> Path:
    """A statistics cache (and hf_encore cache) private to the test: no C₀ from another test is picked up."""
    path = tmp_path / "cache"
    monkeypatch.setenv("HF_ENCORE_CACHE", str(path))
    return path


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
