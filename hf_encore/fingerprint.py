"""Which base weights an adapter was made for: a hash of its edited layers' W_out and a sampled fingerprint of every
part of the model, recorded when the adapter is created and checked whenever it is attached again.

The keys an edit is solved for depend on every layer below the edited ones and its targets on the whole model, so an
adapter attached to other weights (another checkpoint, quantisation or fine-tune) would silently edit wrongly.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch

from .architectures import ModelLayout, get_blocks
from .config import EncoreConfig
from .editing.stats import tensors_fingerprint
from .layer import EncoreLayer

logger = logging.getLogger(__name__)

# Values sampled from each tensor for the base-model fingerprint (see parts_fingerprint).
PARTS_FINGERPRINT_SAMPLES = 4096


class BaseModelMismatchError(ValueError):
    """The adapter was made for other base weights than the ones it is being attached to."""


def edited_weights_fingerprint(model: torch.nn.Module, layout: ModelLayout, layers: Sequence[int]) -> str:
    """A hash of the original W_out of the edited layers (the weights the deltas were solved against).

    Wrapped layers are read through to their base weight, and to the kept original while an adapter is merged.
    """
    blocks = get_blocks(model, layout)
    named = []
    for layer in layers:
        module = blocks[layer].get_submodule(layout.mlp_out)
        weight = module.original_weight if isinstance(module, EncoreLayer) else module.weight
        named.append((f"{layer}.{layout.mlp_out}", weight))
    return tensors_fingerprint(named)


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters and buffers by their unwrapped names, read through Encore wrappers (original
    weights while merged; no deltas)."""
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    for name, module in model.named_modules():
        if isinstance(module, EncoreLayer) and module.merged:
            named[f"{name}.base_layer.weight"] = module.original_weight
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


def base_mismatch(recorded: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """The parts whose fingerprints differ, or that one side lacks (sorted, blocks in numeric order)."""
    differ = [p for p in set(recorded) | set(actual) if recorded.get(p) != actual.get(p)]
    return sorted(differ, key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")])


def record_or_check_base(model: torch.nn.Module, layout: ModelLayout, config: EncoreConfig, adapter_name: str) -> None:
    """Record the base fingerprints in a new adapter's ``config``; for an adapter that has them, raise
    :class:`BaseModelMismatchError` naming the parts that differ (a warning with ``ignore_base_mismatch``)."""
    actual = edited_weights_fingerprint(model, layout, config.layers)
    parts = parts_fingerprint(model, layout)
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
