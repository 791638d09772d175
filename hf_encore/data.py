"""Reading the editing data sets (CounterFact in the EasyEdit schema, zsRE in the ROME schema)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .jsonl import numbered_values


def data_dir() -> Path:
    """``$HF_ENCORE_DATA`` if set, else ``../shared/data`` beside the project checkout."""
    env = os.environ.get("HF_ENCORE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def read_user_text(path: str | os.PathLike) -> str:
    """The text of a file the user supplied (requests, data sets, a corpus): UTF-8, with or without a byte-order
    mark (spreadsheet programs write one, and it would otherwise become part of the first CSV column's name).

    Raises ``FileNotFoundError`` or a ``ValueError`` naming the file and, for other encodings, the first bad byte.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # the byte-order mark of Windows' "Unicode" text
            raise ValueError(f"{path}: UTF-16 text, not UTF-8; save it as UTF-8") from None
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "save it as UTF-8") from None


def _check_limit(limit: Any) -> None:
    # A negative limit would slice off the end of the list (limit=-1 dropped the last request) rather than fail.
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive integer, got {limit!r}")


def load_counterfact(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """CounterFact cases as edit requests plus their evaluation prompts.

    Each record: ``prompt`` (with ``{}``), ``subject``, ``target_new``, ``target_true``, ``rephrase_prompt``,
    ``locality_prompt``, ``locality_ground_truth``, ``case_id``.
    """
    _check_limit(limit)
    path = Path(path) if path else data_dir() / "counterfact" / "counterfact-edit.json"
    try:
        raw = json.loads(read_user_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of CounterFact cases (EasyEdit schema)")
    cases = []
    for i, case in enumerate(raw[:limit] if limit else raw):
        fields = ("subject", "prompt", "target_new", "ground_truth")
        if not isinstance(case, dict) or not all(isinstance(case.get(k), str) for k in fields):
            raise ValueError(f"{path}: case {i} is not a CounterFact case with string fields {list(fields)} "
                             "(EasyEdit schema)")
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
        if not isinstance(rewrite, dict):
            raise ValueError(f"{where}: requested_rewrite must be an object, got {type(rewrite).__name__}")

        def text_of(target: Any) -> Any:  # ROME writes targets as {"str": ..., "id": ...}
            return target.get("str") if isinstance(target, dict) else None

        record = {"prompt": rewrite.get("prompt"), "subject": rewrite.get("subject"),
                  "target_new": text_of(rewrite.get("target_new")), "target_true": text_of(rewrite.get("target_true"))}
    elif "src" in record and "alt" in record:  # ROME zsRE
        record = {"prompt": record["src"], "subject": record.get("subject"), "target_new": record["alt"]}
    elif "ground_truth" in record and "target_true" not in record:  # EasyEdit CounterFact
        record = {**record, "target_true": record["ground_truth"]}
    missing = [k for k in ("prompt", "subject", "target_new") if not isinstance(record.get(k), str)
               or not record[k].strip()]
    if missing:
        raise ValueError(f"{where}: missing or empty field(s) {missing}")
    prompt, subject = record["prompt"], record["subject"]
    if prompt.count("{}") > 1:
        raise ValueError(f"{where}: the prompt {prompt!r} has more than one '{{}}' (the subject's place)")
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
    _check_limit(limit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"request file not found: {path}")
    text = read_user_text(path)
    if path.suffix.lower() == ".csv":
        import csv
        import io

        try:
            records: list[Any] = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as err:  # e.g. a field over csv's size limit: not a CSV of requests
            raise ValueError(f"{path}: not a readable CSV file ({err})") from None
        where = [f"{path}, row {i + 2}" for i in range(len(records))]
    elif path.suffix.lower() == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text.strip()):
        numbered = list(numbered_values(text, path))  # a bad line: "<path>, line <n>: not valid JSON (…)"
        records = [value for _, value in numbered]
        where = [f"{path}, line {n}" for n, _ in numbered]
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply") from None
        records = [records] if isinstance(records, dict) else records
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of requests")
        where = [f"{path}, record {i}" for i in range(len(records))]
    if limit is not None:
        records, where = records[:limit], where[:limit]
    if not records:
        raise ValueError(f"{path}: no requests")
    return [_request_from_record(r, w) for r, w in zip(records, where)]
