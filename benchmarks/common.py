"""What the benchmark scripts share: the data they edit and measure on, a fresh edited model, step counts of an edit
report, a description of the machine, and writing the JSON results.

The scripts run as ``python benchmarks/<name>.py``, so this directory is first on ``sys.path`` and they import this
module as ``common``. JSON lines (``sweep.py``'s results) are read and written by :mod:`hf_encore.jsonl`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from hf_encore import EncoreConfig, get_encore_model, load_model
from hf_encore.data import data_dir, load_counterfact

REQUEST_KEYS = ("prompt", "subject", "target_new")


def data_path(*parts: str) -> Path:
    """A file or folder of the shared data (``hf_encore.data.data_dir()``), e.g. ``data_path("downstream")``."""
    return data_dir().joinpath(*parts)


def corpus_path() -> Path:
    """The statistics text (C₀) every benchmark edits with: WikiText-2 validation."""
    return data_path("corpus", "wikitext-2-valid.txt")


def model_directory(model: str | os.PathLike) -> Path:
    """The folder of ``model``: a model folder as given, else the built-in model of that name (fetched once)."""
    from hf_encore.loading import ensure_builtin

    return Path(model) if Path(model).is_dir() else ensure_builtin(str(model))


def counterfact_cases(split: str = "train", *, first: int = 0, count: int | None = None,
                      path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """CounterFact cases ``first`` to ``first + count`` (to the end without ``count``) of ``path``, by default
    ``counterfact-<split>.json`` of the shared data. Exits with a message if the file holds fewer than asked for."""
    path = Path(path) if path else data_path("counterfact", f"counterfact-{split}.json")
    cases = load_counterfact(path)[first:]
    if count is not None:
        if len(cases) < count:
            raise SystemExit(f"{path.name} has {len(cases)} cases from {first} on, not {count}")
        cases = cases[:count]
    return cases


def edit_requests(cases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The edit requests (prompt, subject, target_new) of CounterFact cases."""
    return [{k: c[k] for k in REQUEST_KEYS} for c in cases]


def encore_model(model: str | os.PathLike, config: EncoreConfig, *, device: str | None = None,
                 dtype: torch.dtype | None = None, corpus: str | os.PathLike | None = None):
    """A freshly loaded ``model`` (a built-in name or a folder; in ``dtype``, default float32) wrapped with an adapter
    of ``config``, editing with statistics of ``corpus`` (default: :func:`corpus_path`); returns
    ``(peft_model, tokenizer)``."""
    base, tokenizer = load_model(str(model), device=device, dtype=dtype or torch.float32)
    peft_model = get_encore_model(base, config, tokenizer=tokenizer, corpus=corpus or corpus_path())
    return peft_model, tokenizer


def z_steps(report) -> int:
    """The z-optimisation steps all requests of an ``EditReport`` took together."""
    return sum(r.steps for r in report.requests)


def mpes_stops(report) -> int:
    """How many requests of an ``EditReport`` the MPES rule stopped early."""
    return sum(r.mpes_stopped for r in report.requests)


def cpu_vector_units() -> str:
    """The vector instructions torch's CPU kernels use here, and whether the CPU has native bf16 arithmetic, which
    decides whether a half-precision model runs faster or ten times slower than float32 (e.g. ``AVX512 +bf16``)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    native_bf16 = flags & {"avx512_bf16", "amx_bf16"}
    return f"{torch.backends.cpu.get_cpu_capability()}{' +bf16' if native_bf16 else ''}"


def machine(device: str | torch.device | None = None) -> str:
    """This machine in one line: architecture, CPU cores and vector units, torch version, torch's CPU threads and,
    when ``device`` is a CUDA device, the GPU's name (e.g. ``x86_64, 16 cores (AVX512 +bf16), torch 2.11.0+cu130, 16
    threads, NVIDIA H200``)."""
    text = (f"{platform.machine()}, {os.cpu_count()} cores ({cpu_vector_units()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    if device is not None and torch.device(device).type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def write_json(path: str | os.PathLike, results: Mapping[str, Any], *, indent: int = 2) -> str:
    """Write ``results`` as JSON to ``path`` (its folder created if needed; tensors' and numpy's numbers as floats)
    and return the text written."""
    text = json.dumps(results, indent=indent, default=float, ensure_ascii=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return text
