"""hf_encore.jsonl: JSON lines read and written in one place (ledger, request files, the lifelong log, benchmarks)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from hf_encore import jsonl
from hf_encore.jsonl import JSONLError, append_jsonl, numbered_values, read_jsonl, write_jsonl

RECORDS = [{"prompt": "{} est né à", "subject": "Éric Satie", "target_new": "東京"},
           {"text": "line\u2028separator, next\u0085line, tab\there", "n": 1, "nested": {"a": [1, 2.5, None]}},
           {}]


def test_round_trip_keeps_non_ascii_text_as_is(tmp_path):
    path = tmp_path / "records.jsonl"
    write_jsonl(path, RECORDS)
    text = path.read_text(encoding="utf-8")
    assert "Éric Satie" in text and "東京" in text  # not \u-escaped
    assert text.count("\n") == len(RECORDS) and text.endswith("\n")
    assert read_jsonl(path) == RECORDS


def test_write_replaces_the_file_and_leaves_it_whole_on_a_bad_record(tmp_path):
    path = tmp_path / "records.jsonl"
    write_jsonl(path, RECORDS)
    write_jsonl(path, RECORDS[:1])
    assert read_jsonl(path) == RECORDS[:1]
    with pytest.raises(TypeError):
        write_jsonl(path, [{"ok": 1}, {"not json": object()}])
    assert read_jsonl(path) == RECORDS[:1]


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('\n{"a": 1}\n\n   \n{"b": 2}\r\n\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    assert list(numbered_values(path.read_text(encoding="utf-8"), path)) == [(2, {"a": 1}), (5, {"b": 2})]
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    assert read_jsonl(tmp_path / "empty.jsonl") == []


@pytest.mark.parametrize("line, problem", [("{not json", "not valid JSON"), ('{"a": 1', "not valid JSON"),
                                           ("[" * 100_000, "JSON nested too deeply"), ("[1, 2]", "not a JSON object"),
                                           ('"text"', "not a JSON object")])
def test_a_bad_line_names_the_file_and_the_line_number(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n' + line + '\n{"b": 2}\n', encoding="utf-8")
    with pytest.raises(JSONLError) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}, line 3: {problem}")
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert (caught.value.path, caught.value.line) == (path, 3)


def test_append_adds_one_line_and_creates_the_file(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, RECORDS[0])
    append_jsonl(path, RECORDS[1])
    assert read_jsonl(path) == RECORDS[:2]
    write_jsonl(path, [])
    append_jsonl(path, {"after": "rewrite"})
    assert path.read_text(encoding="utf-8") == '{"after": "rewrite"}\n'


def test_a_file_that_is_not_utf8_raises_unicode_decode_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"a": "café"}\n'.encode("latin-1"))
    with pytest.raises(UnicodeDecodeError):
        read_jsonl(path)


def test_imports_only_the_standard_library():
    tree = ast.parse(Path(jsonl.__file__).read_text(encoding="utf-8"))
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert all(node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules
