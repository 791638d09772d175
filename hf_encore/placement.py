"""Where a module's computation happens and in which dtype: the one place hf_encore reads devices and dtypes.

A model may sit on one device, or be dispatched by accelerate (``device_map``) over several devices with some
layers offloaded to the CPU or to disk. An offloaded layer's parameters are on ``meta`` between calls and brought to
its *execution device* by its accelerate hook for each forward pass, so "the device of its weight" is the wrong
question: this module answers "where does this module run" and gives temporary access to its real weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _hook(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device where it has one (dispatched and
    offloaded models), else the device of its first parameter or buffer that is not on ``meta``, else the CPU."""
    for candidate in (module, *module.children()):
        device = getattr(_hook(candidate), "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids and masks go: the execution device of its input embeddings."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return execution_device(embeddings if isinstance(embeddings, nn.Module) else model)


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s own parameters off its execution device between calls."""
    return bool(getattr(_hook(module), "offload", False))


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``module``'s own parameters are real tensors on its execution device (an offloaded module
    is loaded as for a forward pass, and offloaded again after); any other module is left as it is."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def offloaded_value(module: nn.Module, name: str, placeholder: torch.Tensor) -> torch.Tensor:
    """The value of ``module``'s own parameter or buffer ``name`` that accelerate offloaded (``placeholder`` is the
    ``meta`` tensor on the module), read from its hook's weights map (CPU memory or disk); ``placeholder`` itself if
    there is none."""
    weights_map = getattr(_hook(module), "weights_map", None)
    if weights_map is None or name not in weights_map:
        return placeholder
    return weights_map[name]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's hidden states travel in: that of its input embeddings (quantised models keep them in
    floating point)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and embeddings.weight.is_floating_point():
        return embeddings.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
