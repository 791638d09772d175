"""Reading the editing data sets (CounterFact in the EasyEdit schema, zsRE in the ROME schema)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def data_dir() -> Path:
    """``$HF_ENCORE_DATA`` if set, else ``../shared/data`` beside the project checkout."""
    env = os.environ.get("HF_ENCORE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_counterfact(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """CounterFact cases as edit requests plus their evaluation prompts.

    Each record: ``prompt`` (with ``{}``), ``subject``, ``target_new``, ``target_true``, ``rephrase_prompt``,
    ``locality_prompt``, ``locality_ground_truth``, ``case_id``.
    """
    path = Path(path) if path else data_dir() / "counterfact" / "counterfact-edit.json"
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    cases = []
    for i, case in enumerate(raw[:limit] if limit else raw):
        subject, prompt = case["subject"], case["prompt"]
        if subject not in prompt:
            raise ValueError(f"{path}: case {i} ({case.get('case_id')}): the subject does not occur in the prompt")
        cases.append({
            "case_id": case.get("case_id", i),
            "prompt": prompt.replace(subject, "{}", 1),
            "subject": subject,
            "target_new": case["target_new"],
            "target_true": case["ground_truth"],
            "rephrase_prompt": case.get("rephrase_prompt"),
            "locality_prompt": case.get("locality_prompt"),
            "locality_ground_truth": case.get("locality_ground_truth"),
        })
    return cases
