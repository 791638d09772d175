"""EditState: what one adapter must remember between ``edit()`` calls (and, later, across save and load).

Nothing here is a module global: two adapters, or two models, never share it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EditState:
    context_templates: list[str] | None = None
    # S_prev per layer: Σ over earlier batches of K Kᵀ [d_k, d_k], float64 (ALGORITHM.md §4).
    prev_key_moments: dict[int, torch.Tensor] = field(default_factory=dict)
    num_edits: int = 0
    num_batches: int = 0
    ledger: list[dict[str, Any]] = field(default_factory=list)
    # Where C₀ of each layer came from (cache key, corpus, token count): a fingerprinted reference, not the data.
    stats_refs: dict[int, dict[str, Any]] = field(default_factory=dict)

    def snapshot(self) -> "EditState":
        """A copy to roll back to. Commits replace the S_prev tensors, never update them in place, so the dict is
        copied but the tensors are shared."""
        return EditState(
            list(self.context_templates) if self.context_templates is not None else None,
            dict(self.prev_key_moments),
            self.num_edits,
            self.num_batches,
            copy.deepcopy(self.ledger),
            copy.deepcopy(self.stats_refs),
        )

    def restore(self, other: "EditState") -> None:
        self.__dict__.update(other.__dict__)


@dataclass
class LayerStatistics:
    """C₀ of one layer as loaded for this process (derived data: recomputable from the reference)."""

    c0: torch.Tensor  # [d_k, d_k] float64
    n_tokens: int
    projector: torch.Tensor | None = None  # AlphaEdit's P, computed once per threshold
    projector_threshold: float | None = None

    @property
    def key_scale(self) -> float:
        """tr(C₀)/d_k: the mean eigenvalue, i.e. the mean squared key coordinate on generic text."""
        return float(torch.diagonal(self.c0).mean())
