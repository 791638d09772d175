"""EncorePeftModel: a ``PeftModelForCausalLM`` whose save and load carry the editing state, and the loaders.

PEFT's own ``save_pretrained`` / ``from_pretrained`` / ``load_adapter`` write and read only the config and the deltas;
that is enough to *use* the edits (and plain PEFT, ``AutoPeftModelForCausalLM`` and transformers' ``load_adapter``
all do), but continuing to edit also needs the previous-edit memory, templates and statistics references
(``serialization.py``). This subclass adds them, writes atomically, checks every file on load and refuses an
adapter made for other base weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional, Sequence

import torch
from peft import PeftModelForCausalLM
from safetensors import safe_open

from .architectures import resolve_layout
from .card import write_model_card
from .config import EncoreConfig
from .editing.report import EditReport
from .editing.requests import EditRequest
from .editing.state import EditState, LayerStatistics
from .fingerprint import measure_base
from .hub import push_to_hub
from .model import edited_layer_shapes
from .save_transaction import recover_interrupted_save, save_transaction
from .serialization import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFileError,
    cast_safetensors,
    check_adapter_config,
    check_state_fits,
    parse_dtype,
    read_edit_state,
    read_json,
    verify_adapter_directory,
    write_edit_state,
)

_HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir")

logger = logging.getLogger(__name__)


def resolve_adapter_dir(model_id: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None,
                        token: str | None = None, cache_dir: str | None = None) -> Path:
    """A local directory for ``model_id``: the directory itself, or a Hub snapshot (``HF_HUB_OFFLINE=1`` reads the
    local Hub cache only). ``subfolder`` must be a relative path inside it."""
    if subfolder is not None:
        parts = PurePosixPath(str(subfolder)).parts
        if (not parts or PurePosixPath(str(subfolder)).is_absolute() or ".." in parts or "\\" in str(subfolder)):
            raise AdapterFileError(f"subfolder {subfolder!r}: must be a relative path inside the adapter repository")
    path = Path(model_id)
    if path.is_dir():
        directory = path
        recovered = recover_interrupted_save(path)  # a save killed mid-commit: finish it or restore the previous one
        if recovered:
            logger.warning("%s", recovered)
    elif path.exists() or str(model_id).startswith((".", "/", "~")) or str(model_id).count("/") != 1:
        raise AdapterFileError(f"{model_id}: no such adapter directory")
    else:
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/*"] if subfolder else None
        directory = Path(snapshot_download(repo_id=str(model_id), revision=revision, token=token,
                                           cache_dir=cache_dir, allow_patterns=patterns))
    return directory.joinpath(*PurePosixPath(str(subfolder)).parts) if subfolder else directory


def _split_hub_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arguments that locate an adapter on the Hub, the rest)."""
    return ({k: kwargs.get(k) for k in _HUB_KWARGS}, {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS})


def read_config(directory: Path, ignore_base_mismatch: bool = False) -> EncoreConfig:
    """The adapter's EncoreConfig; an unreadable, foreign or invalid file raises :class:`AdapterFileError` naming
    it."""
    path = directory / ADAPTER_CONFIG
    check_adapter_config(read_json(path), path)
    try:
        config = EncoreConfig.from_pretrained(str(directory))
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"{path}: {err}") from err
    config._ignore_base_mismatch = ignore_base_mismatch  # read by the tuner when it attaches the adapter
    return config


@dataclass
class CheckedAdapter:
    """An adapter directory whose files have been verified against the model they are about to be attached to."""

    directory: Path
    config: EncoreConfig
    meta: dict | None  # encore_state.json, None when the adapter has no editing state
    state: EditState | None
    statistics: dict[int, LayerStatistics]


def check_adapter(directory: Path, model: torch.nn.Module, ignore_base_mismatch: bool = False) -> CheckedAdapter:
    """Verify every file of ``directory`` and that its deltas and editing state have the sizes of ``model``'s
    edited layers, before anything is attached: a refused adapter leaves the model untouched."""
    meta = verify_adapter_directory(directory)
    config = read_config(directory, ignore_base_mismatch)
    shapes = edited_layer_shapes(model, config)
    expected = {(d_v, d_k) for d_v, d_k in shapes.values()}
    weights = directory / ADAPTER_WEIGHTS
    with safe_open(str(weights), "pt") as f:
        found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    wrong = {key: shape for key, shape in found.items() if shape not in expected}
    if wrong or len(found) != len(shapes):
        raise AdapterFileError(f"{weights}: expected {len(shapes)} deltas of shape {sorted(expected)} for layers "
                               f"{config.layers} of this model, found {len(found)}"
                               f"{', e.g. ' + str(next(iter(wrong.items()))) if wrong else ''}")
    state, statistics = read_edit_state(directory, meta) if meta is not None else (None, {})
    if state is not None:
        check_state_fits(state, statistics, {layer: d_k for layer, (_, d_k) in shapes.items()}, directory)
    # Fingerprinted now, while accelerate's hooks can still read offloaded weights: PEFT removes them from a model
    # with CPU or disk offload before it injects the adapter, and dispatches it again after.
    config._measured_base = measure_base(model, resolve_layout(model, config.block_path, config.mlp_out),
                                         config.layers)
    return CheckedAdapter(directory, config, meta, state, statistics)


class EncorePeftModel(PeftModelForCausalLM):
    """A causal LM with Encore adapters: PEFT's model plus ``edit``, and saving and loading of the editing state.
    ``compute_statistics`` and ``combine_adapters`` reach the tuner (``self.base_model``) through PEFT's attribute
    forwarding."""

    def edit(self, requests: Sequence[Mapping[str, Any] | EditRequest], **kwargs: Any) -> EditReport:
        """Write a batch of facts into the active adapter and return a report: :meth:`EncoreModel.edit
        <hf_encore.model.EncoreModel.edit>` (all its keyword arguments, and any ``EncoreConfig`` setting for this
        call only). If anything fails, the adapter is exactly as before the call."""
        return self.base_model.edit(requests, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        selected_adapters: Optional[list[str]] = None,
        delta_dtype: str | torch.dtype | None = None,
        save_editing_state: bool = True,
        save_statistics: bool = False,
        memory_dtype: str | torch.dtype | None = None,
        metrics: dict[str, Any] | None = None,
        card_metadata: dict[str, Any] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write the adapters to ``save_directory`` atomically (PEFT's layout: ``default`` at the top, others in
        sub-directories named after them).

        Args:
            delta_dtype: store the deltas as ``"bfloat16"`` / ``"float16"`` (half the size; a resumed run is then no
                longer bit-identical). Default: as held, float32.
            save_editing_state: also write the previous-edit memory, templates and ledger needed to continue editing.
            save_statistics: embed C₀ of each edited layer, so the adapter can be edited further on a machine
                without the statistics cache or corpus.
            memory_dtype: dtype of the stored previous-edit memory; ``None`` (default): as held in memory (float64
                up to d_k = 8,192, else float32: ``EncoreConfig.moments_dtype``), which keeps resume exact.
            metrics: figures to show in the model card and record as its evaluation results (e.g.
                ``{"efficacy": 0.98}``).
            card_metadata: more model-card metadata (``huggingface_hub.ModelCardData`` fields: ``datasets``,
                ``license``, ``language``, …), over what hf_encore fills in.
        """
        if not is_main_process:
            return
        delta_dtype = parse_dtype(delta_dtype)
        memory_dtype = parse_dtype(memory_dtype)
        adapters = list(selected_adapters or self.peft_config)
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"No adapter(s) {unknown}; have {sorted(self.peft_config)}")
        kwargs.setdefault("save_embedding_layers", False)  # else PEFT probes the Hub for the base config
        tuner = self.base_model
        with save_transaction(save_directory) as staging:
            super().save_pretrained(str(staging), selected_adapters=adapters, **kwargs)
            for name in adapters:
                out = staging if name == "default" else staging / name
                if delta_dtype is not None:
                    cast_safetensors(out / ADAPTER_WEIGHTS, delta_dtype)
                if save_editing_state:
                    stats = tuner.recorded_statistics(name) if save_statistics else None
                    write_edit_state(tuner.edit_states[name], out, memory_dtype=memory_dtype, statistics=stats)
                write_model_card(out, self.peft_config[name], tuner.edit_states[name], metrics=metrics,
                                 delta_dtype=delta_dtype, extra_metadata=card_metadata)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        *,
        ignore_base_mismatch: bool = False,
        is_trainable: bool = False,
        **kwargs: Any,
    ):
        """Attach a saved adapter as ``adapter_name``: its files are checked, its deltas loaded (as PEFT's
        ``load_adapter`` would, but leaving a model dispatched by accelerate as it is: PEFT removes the hooks of a
        model with CPU or disk offload and dispatches it again, which needs a GPU), and its editing state kept when
        it has one. ``kwargs``: ``revision``, ``subfolder``, ``token``, ``cache_dir`` for an adapter on the Hub."""
        if is_trainable:
            raise ValueError("Encore deltas are written in closed form by edit(), not trained; load with "
                             "is_trainable=False")
        checked = kwargs.pop("_encore_checked", None)  # from hf_encore.from_pretrained: already verified
        hub, kwargs = _split_hub_kwargs(kwargs)
        if checked is None:
            directory = resolve_adapter_dir(model_id, **hub)
            checked = check_adapter(directory, self.base_model.model, ignore_base_mismatch)
        added = adapter_name not in self.peft_config
        if added:
            config = checked.config
            config.inference_mode = True
            self.add_adapter(adapter_name, config)
        if kwargs:
            raise TypeError(f"load_adapter got unexpected arguments {sorted(kwargs)}")
        try:
            result = self._load_deltas(checked, adapter_name)
        except BaseException:
            if added:  # leave the model as it was
                self.delete_adapter(adapter_name)
            raise
        tuner = self.base_model
        if checked.state is not None:
            tuner.edit_states[adapter_name] = checked.state
            for layer, stats in checked.statistics.items():
                tuner.statistics.add(checked.state.stats_refs[layer]["cache_key"], stats)
        else:
            logger.warning("%s has no editing state (saved by plain PEFT or with save_editing_state=False): its "
                           "edits apply, but further edits need start_new_memory=True", checked.directory)
        return result

    def _load_deltas(self, checked: CheckedAdapter, adapter_name: str):
        """Copy the checked adapter's deltas into ``adapter_name``'s (each stays float32 where its layer runs)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = checked.directory / ADAPTER_WEIGHTS
        result = set_peft_model_state_dict(self, load_file(str(weights)), adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if ".encore_delta." in k and k.endswith(f".{adapter_name}")]
        if missing or result.unexpected_keys:
            raise AdapterFileError(f"{weights}: its deltas do not match the model's edited layers (missing "
                                   f"{missing[:2]}, unexpected {list(result.unexpected_keys)[:2]})")
        self.eval()
        return result

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the adapter, its editing state, ledger and model card (see :func:`hf_encore.push_to_hub`)."""
        return push_to_hub(self, repo_id, **kwargs)

    def to_lora(self, directory: str | os.PathLike, *, adapter_name: str = "default", rank: int | None = None):
        """Write the adapter's deltas as a standard PEFT LoRA adapter that plain PEFT (and LoRA-serving engines) load
        without hf_encore: exact at each layer's numerical rank, or truncated to ``rank`` with the relative error
        reported per layer (see :func:`hf_encore.lora_export.export_lora`). Returns that report."""
        from .lora_export import export_lora

        return export_lora(self, directory, adapter_name=adapter_name, rank=rank)


def recorded_base(config: EncoreConfig, directory: str | os.PathLike) -> dict[str, Any]:
    """``load_model`` arguments for the base an adapter records: the built-in model it was made on (the same
    weights on any machine, checked by fingerprint when attached), else its Hub id or path with its GGUF file."""
    if config.base_model_builtin:
        return {"name_or_path": config.base_model_builtin}
    if not config.base_model_name_or_path:
        raise ValueError(f"{directory} does not name its base model: pass the model")
    return {"name_or_path": config.base_model_name_or_path, "gguf_file": config.gguf_file}


def from_pretrained(
    model: torch.nn.Module | None,
    model_id: str | os.PathLike,
    *,
    adapter_name: str = "default",
    ignore_base_mismatch: bool = False,
    tokenizer=None,
    corpus=None,
    **kwargs: Any,
) -> EncorePeftModel:
    """Attach a saved Encore adapter (a directory or a Hub id) to ``model``, ready to use and to edit further.

    ``model=None`` loads the base named in the adapter config (with its GGUF file, if it was loaded from one).
    Raises :class:`~hf_encore.model.BaseModelMismatchError` if the adapter was made for other base weights, unless
    ``ignore_base_mismatch=True``; :class:`~hf_encore.serialization.AdapterFileError` for a damaged file.
    """
    hub, kwargs = _split_hub_kwargs(kwargs)
    directory = resolve_adapter_dir(model_id, **hub)
    if model is None:
        from .loading import load_model

        model, loaded_tokenizer = load_model(**recorded_base(read_config(directory, ignore_base_mismatch),
                                                             directory))
        tokenizer = tokenizer or loaded_tokenizer
    checked = check_adapter(directory, model, ignore_base_mismatch)  # before the model is touched
    checked.config.inference_mode = True
    peft_model = EncorePeftModel(model, checked.config, adapter_name)
    peft_model.load_adapter(directory, adapter_name, _encore_checked=checked, **kwargs)
    peft_model.base_model.set_editing_inputs(tokenizer, corpus)
    return peft_model
