"""JSON lines: one JSON value per line, UTF-8. Read and written here for the whole package (the adapter's ledger,
request files, the lifelong benchmark's log) and the benchmark scripts. Standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping


class JSONLError(ValueError):
    """A line of a JSON-lines file that cannot be read. ``path``, ``line`` (from 1) and ``problem`` say where and
    what; ``error`` is the parser's own exception (``json.JSONDecodeError`` or ``RecursionError``), if any."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str, error: BaseException | None = None):
        super().__init__(f"{path}, line {line}: {problem}")
        self.path, self.line, self.problem, self.error = path, line, problem, error


def numbered_values(text: str, path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of ``text``, the contents of ``path`` (named in errors).

    Lines end at a line feed only (a carriage return before it is JSON whitespace): ``str.splitlines`` would also
    split at U+2028, U+0085 and the like, which a record written with ``ensure_ascii=False`` holds as they are.
    Raises :class:`JSONLError` at the first line that is not JSON (or is nested too deeply to parse).
    """
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise JSONLError(path, number, f"not valid JSON ({err.msg})", err) from None
        except RecursionError as err:  # json's parser recurses once per nesting level
            raise JSONLError(path, number, "JSON nested too deeply", err) from None
        yield number, value


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, one JSON object per non-blank line.

    Raises ``OSError`` or ``UnicodeDecodeError`` if the file cannot be read as UTF-8, and :class:`JSONLError` (a
    ``ValueError``) naming the file and line number for a line that is not JSON or not an object.
    """
    records = []
    for number, value in numbered_values(Path(path).read_text(encoding="utf-8"), path):
        if not isinstance(value, dict):
            raise JSONLError(path, number, "not a JSON object")
        records.append(value)
    return records


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Write ``records`` to ``path``, one per line (UTF-8, non-ASCII text as is), replacing the file. Every record is
    encoded before the file is opened, so one that is not JSON-serialisable leaves the file as it was."""
    text = "".join(_line(r) for r in records)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Add ``record`` as the last line of ``path`` (created if absent); the file is closed when this returns."""
    line = _line(record)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
