"""Downstream degradation tasks as the ENCORE / AlphaEdit papers run them (docs/algorithm.md §7): SST-2, MRPC, CoLA,
RTE, NLI and MMLU, few-shot prompts from a pool of the first 10 items, 100 test items each, a greedy answer of a
few tokens, weighted F1 per task and their mean.

A second, less noisy score comes from the same forward pass: the label word the model finds most likely at the
answer position (single-token label words are read off the first step's logits; others are scored in full).
A task is a row in :data:`TASKS`: its file, prompt template and label words.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..editing.tracing import own_tail_shared_length
from ..placement import input_device
from .scoring import pad_token_id, score_continuations


@dataclass(frozen=True)
class Task:
    name: str
    template: str  # str.format fields from the record; the answer follows it
    label_words: tuple[str, ...]  # label id → the word that answers it
    label_of: Callable[[dict[str, Any]], int]
    fields: Callable[[dict[str, Any]], dict[str, Any]] = lambda item: item


def _int_label(item):
    return int(item["label"])


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sst2", "Review: {sentence}\nSentiment:", ("negative", "positive"), _int_label),
    Task("mrpc", "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo both sentences mean the same thing? Answer:",
         ("No", "Yes"), _int_label),
    Task("cola", "Sentence: {sentence}\nIs this sentence grammatically acceptable? Answer:", ("No", "Yes"),
         _int_label),
    # GLUE RTE: 0 = entailment, 1 = not entailment.
    Task("rte", "{sentence1}\nQuestion: {sentence2} True or False? Answer:", ("True", "False"), _int_label),
    Task("nli", "{sentence1}\nQuestion: {sentence2} True or False? Answer:", ("True", "False"),
         lambda item: 0 if item["label"] == "entailment" else 1),
    Task("mmlu", "Question: {question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:", ("A", "B", "C", "D"),
         lambda item: int(item["answer"]),
         lambda item: {"question": item["question"], **dict(zip("abcd", item["choices"]))}),
)}
POOL_SIZE = 10


def load_task(name: str, directory: str | os.PathLike) -> list[dict[str, Any]]:
    """A task's records from ``<directory>/<name>.json`` (the downstream files of ../shared/data)."""
    if name not in TASKS:
        raise ValueError(f"Unknown downstream task {name!r}; known: {sorted(TASKS)}")
    path = Path(directory) / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable task file ({err})") from err


def weighted_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """F1 per gold class, weighted by the class's support. Predictions outside the gold classes (unparseable
    answers) count against recall."""
    if len(gold) != len(predicted):
        raise ValueError("gold and predicted differ in length")
    if not gold:
        raise ValueError("no items")
    total = 0.0
    for label in set(gold):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        total += f1 * sum(g == label for g in gold)
    return total / len(gold)


def few_shot_prompts(task: Task, items: Sequence[dict[str, Any]], n_shots: int, n_test: int) -> tuple[list[str],
                                                                                                      list[int]]:
    """Prompts for the test items (those after the pool), each preceded by ``n_shots`` answered pool items."""
    if len(items) < POOL_SIZE + 1:
        raise ValueError(f"task {task.name} has {len(items)} items; needs more than the {POOL_SIZE}-item pool")
    shots = "".join(task.template.format(**task.fields(item)) + " " + task.label_words[task.label_of(item)] + "\n\n"
                    for item in items[:n_shots])
    tests = items[POOL_SIZE: POOL_SIZE + n_test]
    return ([shots + task.template.format(**task.fields(item)) for item in tests],
            [task.label_of(item) for item in tests])


def parse_answer(text: str, label_words: Sequence[str]) -> int:
    """The label whose word the generated text starts with (case-insensitive), else -1."""
    match = re.match(r"\s*([A-Za-z]+)", text)
    if not match:
        return -1
    word = match.group(1).lower()
    for label, candidate in enumerate(label_words):
        if word == candidate.lower():
            return label
    return -1


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: Sequence[str], candidates: Sequence[int], *, max_new_tokens: int = 3,
    batch_size: int = 16, progress: bool = False, desc: str = "answers",
) -> tuple[list[str], torch.Tensor]:
    """Greedy continuations of ``prompts`` (as text, special tokens dropped, nothing after an end-of-sequence
    token) and the first step's logits of the ``candidates`` token ids [n, len(candidates)].

    Few-shot prompts share their shots: that common token prefix runs once and its cache is reused by every
    batch, so each item costs only its own tokens. Within a batch the items are left-padded against the prefix
    (padding sits between prefix and item, masked; positions skip it). A sliding-window attention layer counts
    its window in cache slots, padding included: items whose tokens and answer fit in the window share batches
    freely (no slot can fall out of it), longer ones share a batch only with items of their own length.
    """
    from ..editing.tracing import cache_kwarg

    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    shared = own_tail_shared_length(ids)
    device = input_device(model)
    kwarg = cache_kwarg(model)
    pad = pad_token_id(tokenizer)
    eos = torch.tensor(sorted(_eos_ids(model, tokenizer)), device=device, dtype=torch.long)
    prefix_cache = None
    if shared:
        out = model(input_ids=torch.tensor([ids[0][:shared]], device=device), use_cache=True)
        prefix_cache = getattr(out, kwarg)
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    groups: dict[int, list[int]] = {}  # -1: items that fit in the window (or no window); else by length
    for i, s in enumerate(ids):
        groups.setdefault(-1 if not window or len(s) + max_new_tokens < window else len(s), []).append(i)
    batches = [group[j: j + batch_size] for group in groups.values() for j in range(0, len(group), batch_size)]
    texts: list[str] = [""] * len(ids)
    first_logits = torch.empty(len(ids), len(candidates))
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        rows = [ids[i][shared:] for i in batch]
        width = max(len(r) for r in rows)
        item = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        item_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long, device=device), item_mask], 1)
        positions = (shared + item_mask.cumsum(1) - 1).clamp_min(shared)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
        generated = []
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        step_ids = item
        for step in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **({kwarg: cache} if cache is not None else {}))
            cache = getattr(out, kwarg)
            logits = out.logits[:, -1].float()
            if step == 0:
                first_logits[batch] = logits[:, list(candidates)].cpu()
            token = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), logits.argmax(-1))
            generated.append(token)
            finished |= torch.isin(token, eos)
            step_ids = token.unsqueeze(1)
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long, device=device)], 1)
            positions = positions[:, -1:] + 1
        for i, text in zip(batch, tokenizer.batch_decode(torch.stack(generated, 1), skip_special_tokens=True)):
            texts[i] = text
    return texts, first_logits


def evaluate_task(model, tokenizer, task: Task, items: Sequence[dict[str, Any]], *, n_shots: int = 4,
                  n_test: int = 100, max_new_tokens: int = 3, batch_size: int = 16,
                  progress: bool = False) -> dict[str, Any]:
    """Greedy-answer weighted F1 (``f1``) and label-likelihood weighted F1 (``f1_likelihood``) on one task."""
    prompts, gold = few_shot_prompts(task, items, n_shots, n_test)
    first_ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in task.label_words]
    single_token = all(len(ids) == 1 for ids in first_ids) and len({ids[0] for ids in first_ids}) == len(first_ids)
    texts, label_logits = greedy_answers(model, tokenizer, prompts, [ids[0] for ids in first_ids],
                                         max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                         desc=task.name)
    greedy = [parse_answer(t, task.label_words) for t in texts]
    if single_token:
        likely = label_logits.argmax(-1).tolist()
    else:
        nll = torch.stack([score_continuations(model, tokenizer, prompts, [w] * len(prompts)).mean_nll
                           for w in task.label_words], 1)  # [n, labels]
        likely = nll.argmin(1).tolist()
    return {"f1": weighted_f1(gold, greedy), "f1_likelihood": weighted_f1(gold, likely),
            "answered": sum(p >= 0 for p in greedy) / len(greedy), "n": len(gold)}


def downstream_scores(model, tokenizer, directory: str | os.PathLike, tasks: Sequence[str] = tuple(TASKS), *,
                      n_shots: int = 4, n_test: int = 100, progress: bool = True) -> dict[str, Any]:
    """Every task's scores, and their means (``mean_f1``, ``mean_f1_likelihood``)."""
    return task_means({name: evaluate_task(model, tokenizer, TASKS[name], load_task(name, directory), n_shots=n_shots,
                                           n_test=n_test, progress=progress) for name in tasks})


def task_means(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"tasks": per_task, "mean_f1": …, "mean_f1_likelihood": …}`` from :func:`evaluate_task` results."""
    if not per_task:
        raise ValueError("no tasks")
    return {"tasks": per_task,
            "mean_f1": sum(t["f1"] for t in per_task.values()) / len(per_task),
            "mean_f1_likelihood": sum(t["f1_likelihood"] for t in per_task.values()) / len(per_task)}
