"""The layer wrapper: a dense delta per adapter on an MLP output projection.

Every delta is stored as ``[out_features, in_features]`` (W_out's own orientation, ``[d_v, d_k]``) whatever the
base module is; GPT-2's ``Conv1D`` keeps its weight as ``[in, out]``, so merging adds the transpose there.

Deltas are float32 whatever the base's dtype, on the device where their layer executes (its accelerate execution
device when the model is dispatched or offloaded). An edit adds a small update to them each time; in bf16 (8 bits of
mantissa) updates below 1/256 of an entry would round away, and thousands of sequential edits would drift. The
forward pass adds x·Δᵀ computed in float32 and cast to the layer's output dtype. Merging rounds W + Δ to the base
dtype once (the only rounding of the edit); unmerge restores the kept original weight bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .placement import execution_device, onloaded
from .quantized import QuantizedMergeError, check_editable, float_weight, is_quantized


def _is_transposed(base: nn.Module) -> bool:
    """True for modules that store their weight as [in, out] (transformers' ``Conv1D``)."""
    return type(base).__name__ == "Conv1D"


def base_in_out_features(base: nn.Module) -> tuple[int, int]:
    """(d_k, d_v) of a W_out hf_encore can edit; ``TypeError`` naming the type of any other module."""
    if isinstance(base, nn.Linear):
        check_editable(base)
        return base.in_features, base.out_features
    if _is_transposed(base):
        d_in, d_out = base.weight.shape
        return d_in, d_out
    raise TypeError(
        f"Encore edits linear MLP output projections (nn.Linear or Conv1D), not {type(base).__name__}"
    )


class EncoreLayer(BaseTunerLayer):
    adapter_layer_names = ("encore_delta",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.encore_delta = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_in_out_features(base_layer)
        self.transposed = _is_transposed(base_layer)
        # Original weight, kept while anything is merged, so that unmerge restores it bit for bit
        # (W + Δ − Δ ≠ W in floating point).
        self._original_weight: Optional[torch.Tensor] = None
        self.kwargs = kwargs

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight as it was before any merge (the weights the deltas were solved against)."""
        return self._original_weight if self.merged else self.get_base_layer().weight

    @torch.no_grad()
    def float_original_weight(self) -> torch.Tensor:
        """The original W_out [d_v, d_k] in floating point (dequantised if quantised), on its execution device: a
        copy, so it can be read while the layer is offloaded."""
        if self.merged:
            weight = self._original_weight.clone()
        else:
            with onloaded(self.get_base_layer()) as base:
                weight = float_weight(base).clone()
        return weight.T if self.transposed else weight

    def update_layer(self, adapter_name: str, inference_mode: bool = False, **kwargs) -> None:
        device = execution_device(self.get_base_layer())  # not the weight's: offloaded, that is on meta
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=device)
        # Deltas are computed in closed form, never by gradient descent on themselves.
        self.encore_delta[adapter_name] = nn.Parameter(delta, requires_grad=False)
        self.set_adapter(self.active_adapters, inference_mode=True)

    @torch.no_grad()
    def place_deltas(self) -> None:
        """Put every delta in float32 on the device where the layer executes (kept as they are if already there).

        ``model.to(torch.bfloat16)`` or ``.half()`` casts them with the rest of the model: they are brought back to
        float32 (what was rounded away by the cast stays lost, hence the warning)."""
        device = execution_device(self.get_base_layer())
        for name, delta in self.encore_delta.items():
            if delta.device == device and delta.dtype == torch.float32:
                continue
            if delta.device.type == "meta":
                delta = torch.zeros(delta.shape, dtype=torch.float32)
            elif delta.dtype != torch.float32:
                warnings.warn(f"The delta of adapter {name!r} was cast to {delta.dtype} (by model.to() or .half()); "
                              "it is kept in float32 again for editing, but the cast has rounded it", stacklevel=3)
            self.encore_delta[name] = nn.Parameter(delta.to(device, torch.float32), requires_grad=False)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=True)


class Linear(nn.Module, EncoreLayer):
    """Wraps W_out: forward = base(x) + x·Δᵀ for each active adapter."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        EncoreLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's delta in the base weight's own layout (transposed for Conv1D)."""
        delta = self.encore_delta[adapter]
        return delta.T if self.transposed else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if is_quantized(base):
            raise QuantizedMergeError(
                f"Cannot merge into a quantised {type(base).__name__} weight: re-quantising W + Δ would round away "
                "part of the edit. Serve the adapter unmerged (its delta is applied in float32 beside the "
                "quantised weight), or load the base in floating point to merge.")
        merged = base.weight.data.clone() if self._original_weight is None else None
        # W + ΣΔ in float32 (float64 for a float64 base), rounded to the base's dtype once.
        new_weight = base.weight.data.to(torch.promote_types(base.weight.dtype, torch.float32), copy=True)
        for name in adapter_names:
            if name not in self.encore_delta:
                continue
            new_weight += self.get_delta_weight(name).to(new_weight.device, new_weight.dtype)
            if safe_merge and not torch.isfinite(new_weight).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}")
            self.merged_adapters.append(name)
        if merged is not None:
            self._original_weight = merged
        base.weight.data.copy_(new_weight)  # copy_ rounds to the weight's dtype

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().weight.data.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.encore_delta:
                delta = self.encore_delta[name]
                result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "encore." + super().__repr__()
