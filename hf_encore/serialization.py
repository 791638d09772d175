"""What an Encore adapter directory holds beside PEFT's two files, and how it is written and read safely.

    adapter_config.json          PEFT's config (EncoreConfig), small
    adapter_model.safetensors    the deltas ΔW per edited layer (PEFT's format), fp32 or cast to bf16/fp16
    encore_state.safetensors     previous-edit memory S_prev per layer [d_k, d_k] (float64 by default, so that a
                                 resumed run is bit-identical), and optionally C₀ per layer
    encore_state.json            templates, counters, statistics references
    encore_ledger.jsonl          one line per edited batch: requests, method, settings, time, report
    README.md                    the model card
    encore_manifest.json         sha256 and size of every file of the save (one per adapter directory)

Only safetensors and JSON are read, never pickle. The manifest lists the checksum of every file hf_encore wrote, so
a damaged file, or a directory assembled from two different saves, is refused by name; every value in the JSON and
safetensors files is validated too (types, ranges, shapes, finiteness). A save is a
transaction inside the target directory (:mod:`hf_encore.save_transaction`): the new files are written to a hidden
staging folder, then replace exactly the previous save's files (listed in its manifest), the root manifest last; a
journal lets the next save or load finish or undo a save that was killed, so the directory always holds one complete
adapter, and nothing in it that a save did not write is touched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .editing.state import EditState, LayerStatistics
from .jsonl import JSONLError, numbered_values, write_jsonl
from .save_transaction import sha256_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_TENSORS = "encore_state.safetensors"
STATE_JSON = "encore_state.json"
LEDGER = "encore_ledger.jsonl"
FORMAT_VERSION = 1
# The names an hf_encore save writes into each adapter directory (besides its manifest).
OWN_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_TENSORS, STATE_JSON, LEDGER, "README.md")
logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated, corrupted or belongs to another save. The message names the file."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ---- the editing state ----------------------------------------------------------------------------------------


def write_edit_state(
    state: EditState,
    directory: Path,
    *,
    memory_dtype: torch.dtype | None = None,
    statistics: dict[int, LayerStatistics] | None = None,
) -> None:
    """Write ``encore_state.safetensors``, ``encore_ledger.jsonl`` and ``encore_state.json`` into ``directory`` (their
    checksums go into the save's manifest, written when the save commits). ``memory_dtype``: the dtype S_prev is
    written in (``None``: as held, so that a resumed run continues exactly)."""
    tensors = {f"prev_key_moments.{layer}": (m if memory_dtype is None else m.to(memory_dtype)).cpu().contiguous()
               for layer, m in state.prev_key_moments.items()}
    written_dtype = next(iter(tensors.values())).dtype if tensors else (memory_dtype or torch.float64)
    for layer, stats in (statistics or {}).items():
        tensors[f"c0.{layer}"] = stats.c0.float().cpu().contiguous()
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": "hf_encore", "version": str(FORMAT_VERSION)})
    write_jsonl(directory / LEDGER, state.ledger)
    meta = {
        "format_version": FORMAT_VERSION,
        "context_templates": state.context_templates,
        "num_edits": state.num_edits,
        "num_batches": state.num_batches,
        "stats_refs": {str(layer): ref for layer, ref in state.stats_refs.items()},
        "statistics_n_tokens": {str(layer): s.n_tokens for layer, s in (statistics or {}).items()},
        "prev_key_moments_dtype": str(written_dtype).removeprefix("torch."),
    }
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path}: not readable JSON ({err}); the file is corrupted or truncated") from err


def check_safetensors(path: Path, *, finite: bool = False) -> None:
    """Raise :class:`AdapterFileError` naming ``path`` unless it is a complete safetensors file (and, with
    ``finite``, every floating tensor in it is finite)."""
    if not path.is_file():
        raise AdapterFileError(f"{path}: missing")
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if finite:
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise AdapterFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
                else:
                    f.get_slice(key)
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, AdapterFileError):
            raise
        raise AdapterFileError(f"{path}: not a valid safetensors file ({err}); it is corrupted or truncated") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise AdapterFileError(f"{path}: {message}")


def confined_path(directory: Path, name: Any, listed_in: Path) -> Path:
    """``directory / name`` for a file name read from ``listed_in``; names that could lead outside ``directory``
    (absolute, ``..``, backslashes) are refused. Symlinks are not resolved: a Hub snapshot's files are links."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    _require(isinstance(name, str) and bool(name) and "\\" not in name and not PurePosixPath(name).is_absolute()
             and ".." not in parts and "." not in parts and "" not in parts,
             listed_in, f"lists the file {name!r}, which is not a plain path inside {directory}")
    return directory.joinpath(*parts)


def check_adapter_config(config: Any, path: Path) -> None:
    """Refuse an ``adapter_config.json`` that is not an Encore adapter's (its values are validated by
    :class:`~hf_encore.config.EncoreConfig` itself)."""
    _require(isinstance(config, dict), path, f"expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    _require(peft_type == "ENCORE", path, f"peft_type is {peft_type!r}: this is not an hf_encore adapter "
                                          "(hf_encore loads adapters with peft_type 'ENCORE')")


def validate_state_meta(meta: Any, path: Path) -> dict:
    """Check the types and ranges of every value in ``encore_state.json``; return it."""
    _require(isinstance(meta, dict), path, f"expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    _require(_is_int(version) and version >= 1, path, f"format_version must be a positive integer, got {version!r}")
    _require(version <= FORMAT_VERSION, path, f"written by a newer hf_encore (format {version}; this one reads "
                                              f"{FORMAT_VERSION}); upgrade hf_encore to load it")
    for key in ("num_edits", "num_batches"):
        value = meta.get(key, 0)
        _require(_is_int(value) and value >= 0, path, f"{key} must be a non-negative integer, got {value!r}")
    templates = meta.get("context_templates")
    _require(templates is None or (isinstance(templates, list) and all(
        isinstance(t, str) and t.count("{}") == 1 for t in templates)), path,
        "context_templates must be null or a list of strings with one '{}' each")
    refs = meta.get("stats_refs", {})
    _require(isinstance(refs, dict), path, "stats_refs must be an object")
    for layer, ref in refs.items():
        _require(layer.isdigit() and isinstance(ref, dict) and isinstance(ref.get("cache_key"), str)
                 and isinstance(ref.get("corpus_id"), str) and _is_int(ref.get("n_tokens"))
                 and ref["n_tokens"] >= 1, path,
                 f"stats_refs[{layer!r}] must be {{cache_key, corpus_id, n_tokens}} for a layer number, got {ref!r}")
    n_tokens = meta.get("statistics_n_tokens", {})
    _require(isinstance(n_tokens, dict) and all(k.isdigit() and _is_int(v) and v >= 0 for k, v in n_tokens.items()),
             path, f"statistics_n_tokens must map layer numbers to token counts, got {n_tokens!r}")
    dtype = meta.get("prev_key_moments_dtype", "float64")
    _require(isinstance(dtype, str) and dtype in _DTYPES, path,
             f"prev_key_moments_dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    digests = meta.get("sha256", {})  # written by hf_encore before the manifest existed
    _require(isinstance(digests, dict) and all(isinstance(v, str) and len(v) == 64 for v in digests.values()),
             path, "sha256 must map file names to hex digests")
    return meta


def _check_digest(path: Path, digest: str, listed_in: Path, size: int | None = None) -> None:
    if not path.is_file():
        raise AdapterFileError(f"{path}: missing (listed in {listed_in.name})")
    if (size is not None and path.stat().st_size != size) or sha256_file(path) != digest:
        raise AdapterFileError(f"{path}: its contents do not match the checksum saved with the adapter "
                               f"({listed_in.name}); it is corrupted, truncated or from another save")


def verify_adapter_directory(directory: Path) -> dict | None:
    """Check the files of one adapter directory; return the validated ``encore_state.json`` (``None`` if absent).

    Every file hf_encore writes is listed with its sha256 in ``encore_manifest.json``, which catches corrupted,
    truncated and mixed-up files. Adapters written by other tools (plain PEFT) have no manifest: their config
    and the structure of their safetensors are still checked, and their deltas must be finite, but a changed
    value cannot be told from an intended one.
    """
    from .save_transaction import MANIFEST, read_manifest

    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterFileError(f"{config_path}: missing (is {directory} an adapter directory?)")
    try:
        manifest = read_manifest(directory)
    except ValueError as err:
        raise AdapterFileError(str(err)) from err
    state_path = directory / STATE_JSON
    if manifest is not None:
        listed_in = directory / MANIFEST
        files = {name: entry for name, entry in manifest["files"].items() if "/" not in name}
        for name in OWN_FILES:
            if (directory / name).exists() and name not in files:
                raise AdapterFileError(f"{directory / name}: not listed in {MANIFEST}: it is from another save")
        for name, entry in files.items():
            _check_digest(confined_path(directory, name, listed_in), entry["sha256"], listed_in, entry["size"])
    check_adapter_config(read_json(config_path), config_path)
    meta = validate_state_meta(read_json(state_path), state_path) if state_path.is_file() else None
    if manifest is None:
        for name, digest in (meta or {}).get("sha256", {}).items():
            _check_digest(confined_path(directory, name, state_path), digest, state_path)
        if meta is None:
            logger.warning("%s has no checksums (it was not written by hf_encore): its files are checked for "
                           "structure and finite values only", directory)
    check_safetensors(directory / ADAPTER_WEIGHTS, finite=True)
    return meta


_LEDGER_KEYS = {"batch": _is_int, "method": lambda v: isinstance(v, str), "time": lambda v: isinstance(v, (int, float)),
                "requests": lambda v: isinstance(v, list) and all(
                    isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("prompt", "subject", "target_new"))
                    for r in v),
                "report": lambda v: isinstance(v, dict) and isinstance(v.get("requests"), list)
                and isinstance(v.get("layers"), list)}


def read_ledger(path: Path) -> list[dict]:
    """The entries of ``encore_ledger.jsonl`` (empty if absent), each checked to be a batch record."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: not readable ({err})") from err
    ledger = []
    try:
        for number, entry in numbered_values(text, path):
            bad = [key for key, ok in _LEDGER_KEYS.items() if not isinstance(entry, dict) or not ok(entry.get(key))]
            _require(not bad, path, f"line {number} is not a batch record (bad or missing {bad})")
            ledger.append(entry)
    except JSONLError as err:
        raise AdapterFileError(f"{path}: line {err.line} is not JSON ({err.error})") from err
    return ledger


def read_edit_state(directory: Path, meta: dict) -> tuple[EditState, dict[int, LayerStatistics]]:
    """The :class:`EditState` and any embedded statistics saved in ``directory`` (already verified): every tensor
    square, floating and finite, every embedded C₀ with its statistics reference."""
    tensors_path = directory / STATE_TENSORS
    check_safetensors(tensors_path)
    tensors = load_file(str(tensors_path))
    moments, c0s = {}, {}
    for key, value in tensors.items():
        kind, _, layer = key.partition(".")
        _require(kind in ("prev_key_moments", "c0") and layer.isdigit(), tensors_path, f"unexpected tensor {key!r}")
        _require(value.is_floating_point() and value.ndim == 2 and value.shape[0] == value.shape[1], tensors_path,
                 f"{key} must be a square floating matrix, got {tuple(value.shape)} {value.dtype}")
        _require(bool(torch.isfinite(value).all()), tensors_path, f"{key} holds NaN or infinite values")
        # Kept in the float32 or float64 they were written in (held so until an edit converts them); C₀ is float32.
        (moments if kind == "prev_key_moments" else c0s)[int(layer)] = \
            value if value.dtype in (torch.float32, torch.float64) else value.float()
    stats_refs = {int(k): v for k, v in meta.get("stats_refs", {}).items()}
    unreferenced = sorted(set(c0s) - set(stats_refs))
    _require(not unreferenced, tensors_path, f"C₀ of layers {unreferenced} has no statistics reference in {STATE_JSON}")
    n_tokens = meta.get("statistics_n_tokens", {})
    statistics = {layer: LayerStatistics(c0, n_tokens.get(str(layer), 0)) for layer, c0 in c0s.items()}
    state = EditState(
        context_templates=meta.get("context_templates"),
        prev_key_moments=moments,
        num_edits=meta.get("num_edits", 0),
        num_batches=meta.get("num_batches", 0),
        ledger=read_ledger(directory / LEDGER),
        stats_refs=stats_refs,
    )
    return state, statistics


def check_state_fits(state: EditState, statistics: dict[int, LayerStatistics], key_sizes: dict[int, int],
                     directory: Path) -> None:
    """Refuse an editing state whose layers or matrix sizes are not those of the adapter (``key_sizes``: d_k of
    each edited layer)."""
    path = directory / STATE_TENSORS
    for name, per_layer in (("prev_key_moments", state.prev_key_moments), ("c0", statistics)):
        for layer, tensor in per_layer.items():
            matrix = tensor.c0 if isinstance(tensor, LayerStatistics) else tensor
            _require(layer in key_sizes, path, f"{name}.{layer} is for layer {layer}, which the adapter does not edit "
                                               f"(it edits {sorted(key_sizes)})")
            d_k = key_sizes[layer]
            _require(tuple(matrix.shape) == (d_k, d_k), path,
                     f"{name}.{layer} has shape {tuple(matrix.shape)}, expected ({d_k}, {d_k}) for this model")
    bad_refs = sorted(set(state.stats_refs) - set(key_sizes))
    _require(not bad_refs, directory / STATE_JSON, f"stats_refs name layers {bad_refs} that the adapter does not edit")


def cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a safetensors file with its floating tensors in ``dtype`` (keeps PEFT's metadata)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)
