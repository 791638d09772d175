"""Evaluation of edits and of what they cost: CounterFact and zsRE metrics, the downstream tasks, perplexity,
retained knowledge and weight norms. Every function takes any model (edited or not) and a tokenizer."""

from .counterfact import (
                          counterfact_scores,
                          generate,
                          generated_fluency,
                          generation_entropy,
                          harmonic_mean,
                          ngram_entropy,
)
from .degradation import known_facts, perplexity, retained_knowledge, weight_norms
from .downstream import TASKS, Task, downstream_scores, evaluate_task, load_task, parse_answer, task_means, weighted_f1
from .scoring import ContinuationScores, continuation_nll, score_continuations
from .zsre import load_zsre, zsre_scores

__all__ = [
    "TASKS", "ContinuationScores", "Task", "continuation_nll", "counterfact_scores", "downstream_scores",
    "evaluate_task", "generate", "generated_fluency", "generation_entropy", "harmonic_mean", "known_facts", "load_task",
    "load_zsre", "ngram_entropy", "parse_answer", "perplexity", "retained_knowledge", "score_continuations",
    "task_means", "weight_norms", "weighted_f1", "zsre_scores",
]
