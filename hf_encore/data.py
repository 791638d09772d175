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


def _request_from_record(record: Any, where: str) -> dict[str, Any]:
    """One edit request from a record in any of the accepted schemas (see :func:`load_requests`)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    if "requested_rewrite" in record:  # ROME CounterFact
        rewrite = record["requested_rewrite"]
        record = {"prompt": rewrite.get("prompt"), "subject": rewrite.get("subject"),
                  "target_new": (rewrite.get("target_new") or {}).get("str"),
                  "target_true": (rewrite.get("target_true") or {}).get("str")}
    elif "src" in record and "alt" in record:  # ROME zsRE
        record = {"prompt": record["src"], "subject": record.get("subject"), "target_new": record["alt"]}
    elif "ground_truth" in record and "target_true" not in record:  # EasyEdit CounterFact
        record = {**record, "target_true": record["ground_truth"]}
    missing = [k for k in ("prompt", "subject", "target_new") if not isinstance(record.get(k), str)
               or not record[k].strip()]
    if missing:
        raise ValueError(f"{where}: missing or empty field(s) {missing}")
    prompt, subject = record["prompt"], record["subject"]
    if "{}" not in prompt:
        if subject not in prompt:
            raise ValueError(f"{where}: the prompt {prompt!r} has neither '{{}}' nor the subject {subject!r}")
        prompt = prompt.replace(subject, "{}", 1)
    request = {"prompt": prompt, "subject": subject, "target_new": record["target_new"]}
    if isinstance(record.get("target_true"), str):
        request["target_true"] = record["target_true"]
    return request


def load_requests(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """Edit requests from a file: a JSON list, JSON lines, or CSV with a header.

    Records are ``{"prompt", "subject", "target_new"[, "target_true"]}`` (the prompt holds ``{}`` or the subject
    itself), or CounterFact (EasyEdit or ROME schema) or zsRE (ROME schema) records. Raises ``FileNotFoundError``
    or a ``ValueError`` naming the file and the record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"request file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        import csv
        import io

        records: list[Any] = list(csv.DictReader(io.StringIO(text)))
        where = [f"{path}, row {i + 2}" for i in range(len(records))]
    elif path.suffix.lower() == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text.strip()):
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg})") from None
                where.append(f"{path}, line {n}")
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        records = [records] if isinstance(records, dict) else records
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of requests")
        where = [f"{path}, record {i}" for i in range(len(records))]
    if limit:
        records, where = records[:limit], where[:limit]
    if not records:
        raise ValueError(f"{path}: no requests")
    return [_request_from_record(r, w) for r, w in zip(records, where)]
