"""EditState: what one adapter must remember between ``edit()`` calls and across save and load (``serialization.py``).

Nothing here is a module global: two adapters, or two models, never share it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


@dataclass
class EditState:
    context_templates: list[str] | None = None
    # S_prev per layer: Σ over earlier batches of K Kᵀ [d_k, d_k], float64 (docs/algorithm.md §4).
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

    @classmethod
    def combined(cls, states: Mapping[str, "EditState"]) -> "EditState":
        """The state of an adapter holding the edits of all ``states`` (by adapter name): S_prev summed per layer,
        counters added, ledgers joined (each entry naming its ``source_adapter``), the first templates kept."""
        combined = cls()
        combined.context_templates = next((s.context_templates for s in states.values() if s.context_templates),
                                          None)
        for state in states.values():
            for layer, moment in state.prev_key_moments.items():
                prev = combined.prev_key_moments.get(layer)
                combined.prev_key_moments[layer] = moment.clone() if prev is None else prev + moment
            combined.num_edits += state.num_edits
            combined.stats_refs.update(state.stats_refs)
        combined.ledger = [{**entry, "source_adapter": name} for name, state in states.items()
                           for entry in state.ledger]
        combined.num_batches = len(combined.ledger)
        return combined


@dataclass
class LayerStatistics:
    """C₀ of one layer as loaded for this process (derived data: recomputable from the reference)."""

    c0: torch.Tensor  # [d_k, d_k], float64 or float32 (EncoreConfig.moments_dtype), where the layer is solved
    n_tokens: int
    projector: torch.Tensor | None = None  # AlphaEdit's P, computed once per threshold, held as C₀ is
    projector_threshold: float | None = None

    def stored_as(self, dtype: torch.dtype, device: torch.device) -> "LayerStatistics":
        """These statistics held in ``dtype`` on ``device`` (``self`` if they already are)."""
        if self.c0.dtype == dtype and self.c0.device == device:
            return self
        return LayerStatistics(self.c0.to(device=device, dtype=dtype), self.n_tokens)

    @property
    def key_scale(self) -> float:
        """tr(C₀)/d_k: the mean eigenvalue, i.e. the mean squared key coordinate on generic text."""
        return float(torch.diagonal(self.c0).mean())
