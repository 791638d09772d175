"""Downstream degradation tasks as the ENCORE / AlphaEdit papers run them (ALGORITHM.md §7): SST-2, MRPC, CoLA,
RTE, NLI and MMLU, few-shot prompts from a pool of the first 10 items, 100 test items each, a greedy answer of a
few tokens, weighted F1 per task and their mean.

A second, less noisy score comes from the same forward pass: the label word the model finds most likely at the
answer position (single-token label words are read off the first step's logits; others are scored in full).
A task is a row in :data:`TASKS`: its file, prompt template and label words.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

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


@torch.no_grad()
def evaluate_task(model, tokenizer, task: Task, items: Sequence[dict[str, Any]], *, n_shots: int = 4,
                  n_test: int = 100, max_new_tokens: int = 3, batch_size: int = 8,
                  progress: bool = False) -> dict[str, Any]:
    """Greedy-answer weighted F1 (``f1``) and label-likelihood weighted F1 (``f1_likelihood``) on one task."""
    prompts, gold = few_shot_prompts(task, items, n_shots, n_test)
    device = next(model.parameters()).device
    first_ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in task.label_words]
    single_token = all(len(ids) == 1 for ids in first_ids) and len({ids[0] for ids in first_ids}) == len(first_ids)
    greedy, likely = [], []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=task.name, disable=not progress, leave=False):
            batch = tokenizer(prompts[start: start + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=pad_token_id(tokenizer))
            texts = tokenizer.batch_decode(out.sequences[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            greedy += [parse_answer(t, task.label_words) for t in texts]
            if single_token:
                choice = out.logits[0][:, [ids[0] for ids in first_ids]].argmax(-1)
                likely += choice.tolist()
    finally:
        tokenizer.padding_side = padding_side
    if not single_token:
        nll = torch.stack([score_continuations(model, tokenizer, prompts, [w] * len(prompts)).mean_nll
                           for w in task.label_words], 1)  # [n, labels]
        likely = nll.argmin(1).tolist()
    return {"f1": weighted_f1(gold, greedy), "f1_likelihood": weighted_f1(gold, likely),
            "answered": sum(p >= 0 for p in greedy) / len(greedy), "n": len(gold)}


def downstream_scores(model, tokenizer, directory: str | os.PathLike, tasks: Sequence[str] = tuple(TASKS), *,
                      n_shots: int = 4, n_test: int = 100, progress: bool = True) -> dict[str, Any]:
    """Every task's scores, and their means (``mean_f1``, ``mean_f1_likelihood``)."""
    per_task = {name: evaluate_task(model, tokenizer, TASKS[name], load_task(name, directory), n_shots=n_shots,
                                    n_test=n_test, progress=progress) for name in tasks}
    return {"tasks": per_task,
            "mean_f1": sum(t["f1"] for t in per_task.values()) / len(per_task),
            "mean_f1_likelihood": sum(t["f1_likelihood"] for t in per_task.values()) / len(per_task)}
