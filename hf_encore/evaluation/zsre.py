"""zsRE metrics (docs/algorithm.md §7): teacher-forced token accuracy of the new answer on the question (ES) and its
rephrase (PS), and of the unrelated question's answer (NS)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..editing.prompt_format import PLAIN, PromptFormat
from .scoring import score_continuations


def load_zsre(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """zsRE records (ROME ``zsre_mem_eval`` schema) as edit requests plus their evaluation prompts.

    Each record: ``prompt`` (the question with ``{}`` for the subject), ``subject``, ``target_new`` (``alt``),
    ``rephrase_prompt``, ``locality_prompt`` (``loc``), ``locality_ground_truth`` (``loc_ans``), ``answers``.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable zsRE JSON file ({err})") from err
    records = []
    for i, item in enumerate(raw[:limit] if limit else raw):
        missing = [k for k in ("subject", "src", "rephrase", "alt", "loc", "loc_ans") if k not in item]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing}")
        if item["subject"] not in item["src"]:
            raise ValueError(f"{path}: record {i}: the subject {item['subject']!r} does not occur in the question")
        records.append({
            "prompt": item["src"].replace(item["subject"], "{}", 1), "subject": item["subject"],
            "target_new": item["alt"], "rephrase_prompt": item["rephrase"],
            "locality_prompt": item["loc"], "locality_ground_truth": item["loc_ans"],
            "answers": item.get("answers", []), "case_id": i,
        })
    return records


def zsre_scores(model, tokenizer, records: Sequence[dict[str, Any]], max_tokens: int = 4096,
                form: PromptFormat = PLAIN) -> dict[str, Any]:
    """Mean token accuracy on question (ES), rephrase (PS) and unrelated question (NS), as fractions, every
    question read through ``form``."""
    new = [r["target_new"] for r in records]
    groups = {
        "ES": ([r["prompt"].replace("{}", r["subject"]) for r in records], new),
        "PS": ([r["rephrase_prompt"] for r in records], new),
        "NS": ([r["locality_prompt"] for r in records], [r["locality_ground_truth"] for r in records]),
    }
    results: dict[str, Any] = {"per_case": {}}
    for name, (prompts, answers) in groups.items():
        accuracy = score_continuations(model, tokenizer, prompts, answers, max_tokens=max_tokens,
                                       form=form).token_accuracy
        results[name] = float(accuracy.mean())
        results["per_case"][name] = accuracy.tolist()
    return results
