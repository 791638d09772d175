"""Which base weights an adapter was made for: a hash of its edited layers' W_out and a sampled fingerprint of every
part of the model, recorded when the adapter is created and checked whenever it is attached again.

The keys an edit is solved for depend on every layer below the edited ones and its targets on the whole model, so an
adapter attached to other weights (another checkpoint, quantisation or fine-tune) would silently edit wrongly. The
same sampled fingerprint keys the statistics cache (:func:`combined_fingerprint`): C₀ of one model is never used for
another, and attaching to an 8B base costs milliseconds, not a pass over 16 GB.

Tensors that accelerate has offloaded (``meta`` on the module, the values in its hook's weights map, on the CPU or
on disk) are read one at a time from there, so a dispatched model has the same fingerprint as the same weights on
one device.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch

from .architectures import ModelLayout, get_blocks
from .config import EncoreConfig
from .layer import EncoreLayer
from .placement import offloaded_value
from .quantized import repacked_for_cpu, stored_codes

TensorOrLoader = Union[torch.Tensor, Callable[[], torch.Tensor]]

logger = logging.getLogger(__name__)

# Values sampled from each tensor for the base-model fingerprint (see parts_fingerprint).
PARTS_FINGERPRINT_SAMPLES = 4096


class BaseModelMismatchError(ValueError):
    """The adapter was made for other base weights than the ones it is being attached to."""


def tensors_fingerprint(named_tensors: Iterable[tuple[str, TensorOrLoader]], samples: int | None = None) -> str:
    """A hash of named tensors: names, shapes, dtypes and bytes (shared storage counted once). A tensor may be given
    as a function that loads it (an offloaded one: loaded, hashed and dropped before the next).

    ``samples``: hash only that many evenly spaced elements of each tensor (bounded time on large models).
    """
    digest = hashlib.blake2b(digest_size=16)
    seen: set[int] = set()
    for name, tensor in named_tensors:
        if callable(tensor):
            tensor = tensor()
        elif tensor.data_ptr() in seen:
            continue
        else:
            seen.add(tensor.data_ptr())
        if tensor.device.type == "meta":
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        t = tensor.detach().reshape(-1)  # 0-dim buffers (Gemma's embedding scale) too
        if samples is not None and t.numel() > samples:
            t = t[torch.arange(samples, device=t.device) * (t.numel() - 1) // (samples - 1)]  # exact in int64
        t = t.contiguous().cpu()
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _readable(module: torch.nn.Module, attr: str, tensor: torch.Tensor) -> TensorOrLoader:
    """``tensor`` (``module``'s own ``attr``), or, if accelerate offloaded it, a function that loads its value (for
    a 4-bit weight bitsandbytes repacked for its CPU kernel, one that gives the codes as loaded)."""
    if attr == "weight" and repacked_for_cpu(module):
        return lambda: stored_codes(module)
    if tensor.device.type != "meta":
        return tensor
    return lambda: offloaded_value(module, attr, tensor)


def edited_weights_fingerprint(model: torch.nn.Module, layout: ModelLayout, layers: Sequence[int]) -> str:
    """A hash of the original W_out of the edited layers (the weights the deltas were solved against).

    Wrapped layers are read through to their base weight, and to the kept original while an adapter is merged.
    """
    blocks = get_blocks(model, layout)
    named = []
    for layer in layers:
        module = blocks[layer].get_submodule(layout.mlp_out)
        wrapped = isinstance(module, EncoreLayer)
        weight = module.original_weight if wrapped else module.weight  # the kept original while merged: real
        named.append((f"{layer}.{layout.mlp_out}",
                      _readable(module.get_base_layer() if wrapped else module, "weight", weight)))
    return tensors_fingerprint(named)


def base_parameters(model: torch.nn.Module) -> dict[str, TensorOrLoader]:
    """The base model's parameters and buffers by their unwrapped names, read through Encore wrappers (original
    weights while merged; no deltas); an offloaded one as a function that loads it."""
    def readable(name: str, tensor: torch.Tensor) -> TensorOrLoader:
        if tensor.device.type != "meta":  # the owner is looked up for offloaded tensors only
            return tensor
        owner, _, attr = name.rpartition(".")
        return _readable(model.get_submodule(owner), attr, tensor)

    named = {name: readable(name, t) for name, t in model.named_parameters()}
    named.update((name, readable(name, t)) for name, t in model.named_buffers())
    for name, module in model.named_modules():
        if isinstance(module, EncoreLayer) and module.merged:
            named[f"{name}.base_layer.weight"] = module.original_weight
        elif repacked_for_cpu(module):  # running the model must not change its fingerprint
            named[f"{name}.weight"] = _readable(module, "weight", module.weight)
    return {name.replace(".base_layer.", "."): t for name, t in named.items() if ".encore_delta." not in name}


def parts_fingerprint(model: torch.nn.Module, layout: ModelLayout) -> dict[str, str]:
    """A sampled fingerprint of each part of the model: every decoder block, and every module outside them
    (embeddings, final norm, unembedding).

    The keys an edit is solved for depend on every layer below the edited ones and its targets on the whole model,
    so an adapter must meet the same weights everywhere. Hashing every byte of an 8B model takes minutes; a
    strided sample of each tensor (names, shapes, dtypes and ``PARTS_FINGERPRINT_SAMPLES`` values) takes
    milliseconds and still tells another model, quantisation or fine-tune apart.
    """
    prefix = layout.block_path + "."
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in base_parameters(model).items():
        if name.startswith(prefix):
            part = prefix + name[len(prefix):].split(".", 1)[0]
        else:
            part = name.rsplit(".", 1)[0] if "." in name else name
        groups.setdefault(part, []).append((name, tensor))
    return {part: tensors_fingerprint(named, samples=PARTS_FINGERPRINT_SAMPLES) for part, named in groups.items()}


def combined_fingerprint(parts: Mapping[str, str]) -> str:
    """One hash of a model's :func:`parts_fingerprint` (the statistics cache's key for the base model)."""
    return hashlib.sha256(json.dumps(sorted(parts.items())).encode()).hexdigest()[:32]


def base_mismatch(recorded: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """The parts whose fingerprints differ, or that one side lacks (sorted, blocks in numeric order)."""
    differ = [p for p in set(recorded) | set(actual) if recorded.get(p) != actual.get(p)]
    return sorted(differ, key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")])


def measure_base(model: torch.nn.Module, layout: ModelLayout, layers: Sequence[int]) -> tuple[str, dict[str, str]]:
    """(:func:`edited_weights_fingerprint`, :func:`parts_fingerprint`) of ``model``."""
    return edited_weights_fingerprint(model, layout, layers), parts_fingerprint(model, layout)


def record_or_check_base(config: EncoreConfig, adapter_name: str, measured: tuple[str, Mapping[str, str]]) -> None:
    """Record the base fingerprints ``measured`` (:func:`measure_base`) in a new adapter's ``config``; for an adapter
    that has them, raise :class:`BaseModelMismatchError` naming the parts that differ (a warning with
    ``ignore_base_mismatch``)."""
    actual, parts = measured[0], dict(measured[1])
    differ = base_mismatch(config.base_model_parts_fingerprint, parts) \
        if config.base_model_parts_fingerprint is not None else []
    if config.base_model_fingerprint is None:
        config.base_model_fingerprint = actual
    if config.base_model_parts_fingerprint is None:
        config.base_model_parts_fingerprint = parts
    if config.base_model_fingerprint == actual and not differ:
        return
    where = (f"these parts differ: {', '.join(differ[:8])}{' …' if len(differ) > 8 else ''} "
             f"({len(differ)} of {len(parts)})" if differ else
             f"the weights of its edited layers {config.layers} differ")
    made_on = ", ".join(x for x in (config.base_model_name_or_path and repr(config.base_model_name_or_path),
                                    config.gguf_file and f"GGUF {config.gguf_file}") if x)
    message = (f"Adapter {adapter_name!r} was made for another base model{f' ({made_on})' if made_on else ''}"
               f": {where}. Its edits were solved "
               "against those weights. To attach it anyway, pass ignore_base_mismatch=True to "
               "hf_encore.from_pretrained / load_adapter.")
    if not getattr(config, "_ignore_base_mismatch", False):
        raise BaseModelMismatchError(message)
    logger.warning("%s Attaching it as asked.", message.split(" To attach")[0])
