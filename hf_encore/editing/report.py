"""What ``edit()`` returns: per request and per layer figures, and where the time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestReport:
    prompt: str
    subject: str
    target_new: str
    steps: int  # optimiser steps of the z-optimisation
    mpes_stopped: bool
    p_target_before: float  # p(target_new | raw prompt), teacher-forced, before this batch
    p_target_after: float
    final_loss: float


@dataclass
class LayerReport:
    layer: int
    delta_norm: float  # ‖ΔW‖_F of this batch's update
    weight_norm_ratio: float  # ‖W‖_F / ‖W₀‖_F after the batch (all of this adapter's edits)


@dataclass
class EditReport:
    method: str
    adapter_name: str
    requests: list[RequestReport]
    layers: list[LayerReport]
    seconds: dict[str, float] = field(default_factory=dict)  # templates, statistics, targets, keys, solve, total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def success_rate(self) -> float:
        """Fraction of requests whose target became more probable than before (a quick sanity figure)."""
        return sum(r.p_target_after > r.p_target_before for r in self.requests) / max(1, len(self.requests))

    def __str__(self) -> str:
        lines = [f"{self.method} edit of {len(self.requests)} request(s) on adapter {self.adapter_name!r} "
                 f"in {self.seconds.get('total', float('nan')):.1f} s"]
        lines.append(f"  {'subject':<28} {'target':<16} {'steps':>5} {'MPES':>4} {'p before':>9} {'p after':>9}")
        for r in self.requests:
            lines.append(f"  {r.subject[:28]:<28} {r.target_new[:16]:<16} {r.steps:>5} "
                         f"{'yes' if r.mpes_stopped else 'no':>4} {r.p_target_before:>9.4f} {r.p_target_after:>9.4f}")
        for lay in self.layers:
            lines.append(f"  layer {lay.layer:>3}: ‖ΔW‖_F = {lay.delta_norm:.4f}, "
                         f"‖W‖_F/‖W₀‖_F = {lay.weight_norm_ratio:.6f}")
        return "\n".join(lines)
