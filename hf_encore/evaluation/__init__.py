"""Evaluation of edits: the papers' CounterFact metrics."""

from .counterfact import continuation_nll, counterfact_scores

__all__ = ["continuation_nll", "counterfact_scores"]
