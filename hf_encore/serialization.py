"""What an Encore adapter directory holds beside PEFT's two files, and how it is written and read safely.

    adapter_config.json          PEFT's config (EncoreConfig), small
    adapter_model.safetensors    the deltas ΔW per edited layer (PEFT's format), fp32 or cast to bf16/fp16
    encore_state.safetensors     previous-edit memory S_prev per layer [d_k, d_k] (float64 by default, so that a
                                 resumed run is bit-identical), and optionally C₀ per layer
    encore_state.json            templates, counters, statistics references, and the sha256 of every other file
    encore_ledger.jsonl          one line per edited batch: requests, method, settings, time, report
    README.md                    the model card

Only safetensors and JSON are read, never pickle. ``encore_state.json`` is written last and lists the checksums of
the files it belongs with, so a directory assembled from two different saves is refused by name. Whole directories
are written beside the target and renamed into place (:func:`atomic_directory`), so an interrupted save never leaves
a directory that loads with wrong contents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .editing.state import EditState, LayerStatistics

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_TENSORS = "encore_state.safetensors"
STATE_JSON = "encore_state.json"
LEDGER = "encore_ledger.jsonl"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated, corrupted or belongs to another save. The message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ---- whole-directory writes -----------------------------------------------------------------------------------


def _is_adapter_entry(path: Path) -> bool:
    """Entries a save replaces: our files, and sub-directories holding another adapter of the same model."""
    name = path.name
    if path.is_dir():
        return (path / ADAPTER_CONFIG).exists()
    return name.startswith(("adapter_", "encore_")) or name == "README.md"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory beside ``target``; on success it replaces ``target`` by rename.

    Files of ``target`` that are not adapter files (a user's own notes, say) are carried over. If the body raises,
    ``target`` is untouched. A kill between the two renames leaves no ``target`` (the old one is kept as
    ``.<name>.old-*`` beside it), never a mixed one.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.saving-"))
    try:
        yield staging
        if target.exists():
            for entry in target.iterdir():
                if not (staging / entry.name).exists() and not _is_adapter_entry(entry):
                    shutil.copytree(entry, staging / entry.name) if entry.is_dir() else shutil.copy2(
                        entry, staging / entry.name)
        _fsync_tree(staging)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ---- the editing state ----------------------------------------------------------------------------------------


def write_edit_state(
    state: EditState,
    directory: Path,
    *,
    memory_dtype: torch.dtype = torch.float64,
    statistics: dict[int, LayerStatistics] | None = None,
) -> None:
    """Write ``encore_state.safetensors``, ``encore_ledger.jsonl`` and, last, ``encore_state.json`` (with the
    checksums of the deltas and of the other two files) into ``directory``."""
    tensors = {f"prev_key_moments.{layer}": m.to(memory_dtype).contiguous() for layer, m in
               state.prev_key_moments.items()}
    for layer, stats in (statistics or {}).items():
        tensors[f"c0.{layer}"] = stats.c0.float().contiguous()
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": "hf_encore", "version": str(FORMAT_VERSION)})
    with open(directory / LEDGER, "w", encoding="utf-8") as f:
        for entry in state.ledger:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    checked = [name for name in (ADAPTER_WEIGHTS, STATE_TENSORS, LEDGER) if (directory / name).exists()]
    meta = {
        "format_version": FORMAT_VERSION,
        "context_templates": state.context_templates,
        "num_edits": state.num_edits,
        "num_batches": state.num_batches,
        "stats_refs": {str(layer): ref for layer, ref in state.stats_refs.items()},
        "statistics_n_tokens": {str(layer): s.n_tokens for layer, s in (statistics or {}).items()},
        "prev_key_moments_dtype": str(memory_dtype).removeprefix("torch."),
        "sha256": {name: sha256_file(directory / name) for name in checked},
    }
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path}: not readable JSON ({err}); the file is corrupted or truncated") from err


def check_safetensors(path: Path) -> None:
    """Raise :class:`AdapterFileError` naming ``path`` unless it is a complete safetensors file."""
    if not path.is_file():
        raise AdapterFileError(f"{path}: missing")
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path}: not a valid safetensors file ({err}); it is corrupted or truncated") from err


def verify_adapter_directory(directory: Path) -> dict | None:
    """Check the files of one adapter directory; return the parsed ``encore_state.json`` (``None`` if absent).

    Checksums recorded at save time catch corrupted, truncated and mixed-up files; without them (an adapter
    saved by plain PEFT) the safetensors headers and sizes are still checked.
    """
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterFileError(f"{config_path}: missing (is {directory} an adapter directory?)")
    read_json(config_path)
    state_path = directory / STATE_JSON
    meta = read_json(state_path) if state_path.is_file() else None
    if meta is not None:
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise AdapterFileError(f"{state_path}: written by a newer hf_encore (format "
                                   f"{meta.get('format_version')}); upgrade hf_encore to load it")
        for name, digest in meta.get("sha256", {}).items():
            path = directory / name
            if not path.is_file():
                raise AdapterFileError(f"{path}: missing (listed in {STATE_JSON})")
            if sha256_file(path) != digest:
                raise AdapterFileError(f"{path}: its contents do not match the checksum saved with the adapter; it "
                                       "is corrupted, truncated or from another save")
    check_safetensors(directory / ADAPTER_WEIGHTS)
    return meta


def read_edit_state(directory: Path, meta: dict) -> tuple[EditState, dict[int, LayerStatistics]]:
    """The :class:`EditState` and any embedded statistics saved in ``directory`` (already verified)."""
    tensors_path = directory / STATE_TENSORS
    check_safetensors(tensors_path)
    tensors = load_file(str(tensors_path))
    ledger: list[dict] = []
    ledger_path = directory / LEDGER
    if ledger_path.is_file():
        for number, line in enumerate(ledger_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    ledger.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise AdapterFileError(f"{ledger_path}: line {number} is not JSON ({err})") from err
    moments = {int(k.split(".", 1)[1]): v.double() for k, v in tensors.items() if k.startswith("prev_key_moments.")}
    n_tokens = meta.get("statistics_n_tokens", {})
    statistics = {int(k.split(".", 1)[1]): LayerStatistics(v.double(), int(n_tokens.get(k.split(".", 1)[1], 0)))
                  for k, v in tensors.items() if k.startswith("c0.")}
    state = EditState(
        context_templates=meta.get("context_templates"),
        prev_key_moments=moments,
        num_edits=int(meta.get("num_edits", 0)),
        num_batches=int(meta.get("num_batches", 0)),
        ledger=ledger,
        stats_refs={int(k): v for k, v in meta.get("stats_refs", {}).items()},
    )
    return state, statistics


def cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a safetensors file with its floating tensors in ``dtype`` (keeps PEFT's metadata)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)
