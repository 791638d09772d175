"""Quantised W_out: reading the float weight behind a quantised layer, and telling which layers can be edited.

An edit never changes the base weight: its delta is a float32 matrix beside W_out, added to the layer's output
(``layer.Linear``). So a quantised W_out can be edited as long as its float weight can be read, for the norms of the
report (‖W‖/‖W₀‖) and the tests; the keys and targets come from forward passes, which the quantised layer runs
itself. Merging is another matter: adding a delta to a quantised weight means re-quantising it, which rounds the
edit away in part (int8 rows keep 8 bits of their largest entry, NF4 blocks 4 bits), so ``merge`` refuses.

One row per supported quantised layer type: its weight's dequantisation. Any other layer whose weight is not in
floating point is refused when the adapter is attached, naming its type.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


def _bnb_int8(module: nn.Module) -> torch.Tensor:
    # Linear8bitLt keeps the row scales on the weight (SCB) or, once quantised on some backends, on its state.
    from bitsandbytes.functional import int8_vectorwise_dequant

    scales = getattr(module.weight, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    return int8_vectorwise_dequant(module.weight.data, scales)


def _bnb_4bit(module: nn.Module) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(*_bnb_4bit_codes(module)).float()


def _bnb_4bit_codes(module: nn.Module):
    """A 4-bit layer's codes and quantisation state in the layout ``dequantize_4bit`` reads."""
    if repacked_for_cpu(module):
        return _bnb_4bit_unpacked_for_cpu(module.weight.data, module.weight.quant_state)
    return module.weight.data, module.weight.quant_state


def _bnb_4bit_unpacked_for_cpu(packed: torch.Tensor, state):
    """The codes and state of a 4-bit weight that bitsandbytes (0.50 and later) repacked for its CPU kernel, in the
    layout ``dequantize_4bit`` reads; the module's own weight and state are left as they are.

    On a CPU with AVX512-BF16 the first inference forward rewrites the weight in place: codes interleaved in blocks
    of 32 output rows, and the block scales (already dequantised if they were double-quantised) as a bf16
    [in / blocksize, out] matrix. bitsandbytes' own inverse restores the codes, but re-quantises double-quantised
    scales, and leaves single-quantised ones transposed; so only its code restoration is used, on a copy of the
    state, and the scales are put back in dequantize_4bit's order here — as the kernel uses them, in bf16."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    scales = state.absmax  # [in / blocksize, out], bf16
    restored = copy.copy(state)
    restored.original_nested = False  # keep the inverse from re-quantising the scales
    codes, restored = _convert_weight_packed_for_cpu_inverse(packed.clone(), restored)
    restored.absmax = scales.T.reshape(-1).float()  # nested is already False: repacking dequantised the scales
    return codes, restored


# Quantised layer types hf_encore can edit (by class name, so that their packages need not be installed):
# their float weight [out, in].
DEQUANTIZE: dict[str, Callable[[nn.Module], torch.Tensor]] = {
    "Linear8bitLt": _bnb_int8,  # bitsandbytes load_in_8bit
    "Linear4bit": _bnb_4bit,  # bitsandbytes load_in_4bit (NF4 / FP4)
}


class QuantizedMergeError(RuntimeError):
    """A delta cannot be merged into a quantised weight without losing part of it."""


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored quantised (not as floating point)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ in DEQUANTIZE or (weight is not None and not weight.is_floating_point())


def check_editable(module: nn.Module) -> None:
    """Raise ``TypeError`` naming the layer type when ``module`` is quantised in a way hf_encore cannot read."""
    if is_quantized(module) and type(module).__name__ not in DEQUANTIZE:
        raise TypeError(
            f"W_out is a {type(module).__module__}.{type(module).__name__} with a {module.weight.dtype} weight: "
            f"hf_encore can edit float layers and the quantised types {sorted(DEQUANTIZE)} (bitsandbytes), not this "
            "one. Load the base model without this quantisation to edit it.")


def repacked_for_cpu(module: nn.Module) -> bool:
    """Whether bitsandbytes rewrote ``module``'s 4-bit weight into its CPU kernel's layout (see
    :func:`_bnb_4bit_unpacked_for_cpu`)."""
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def stored_codes(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as it was loaded: the quantised codes in their stored layout, even after bitsandbytes
    repacked them for its CPU kernel (what fingerprints hash, so that running the model does not change them)."""
    return _bnb_4bit_codes(module)[0] if repacked_for_cpu(module) else module.weight


def float_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight in floating point, in its own layout (dequantised to float32 for a quantised layer; the
    stored tensor itself otherwise). The weight must be on its execution device (``placement.onloaded``)."""
    dequantize = DEQUANTIZE.get(type(module).__name__)
    return dequantize(module) if dequantize is not None else module.weight
