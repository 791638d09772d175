"""Every user error is one clear line: settings (API, config files, ``--set``), numeric CLI options, unreadable
request files, adapters hf_encore cannot read, an unreachable Hub, and ``merge --out`` onto existing files.

No real model: the CLI checks must fail before any model loads (``_load`` is replaced by a sentinel that fails the
test if reached), and the adapters are the tiny ones of ``tiny_models.py``. The property-based tests count the cases
they try in ``CASES``; the totals are printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_encore.apps.cli as cli
from hf_encore import EncoreConfig
from hf_encore.apps.cli import main
from hf_encore.apps.options import parse_value
from hf_encore.config import SETTINGS, check_given_setting, check_setting
from hf_encore.data import load_counterfact, load_requests, read_user_text

REQUESTS = [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
            {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}]

# (property, outcome) -> cases tried; printed when the module ends.
CASES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def case_totals():
    yield
    if CASES:
        print("\nproperty-based cases tried:")
        for (prop, outcome), n in sorted(CASES.items()):
            print(f"  {prop:<16} {outcome:<28} {n}")


class ReachedLoad(BaseException):
    """Raised by the stand-in for ``cli._load``: a BaseException, so that no user-error handler swallows it."""


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise ReachedLoad
    monkeypatch.setattr(cli, "_load", refuse)


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """(exit status, or "load" where the command got as far as loading a model; stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code: int | str = main(argv)
        except ReachedLoad:
            code = "load"
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, err.getvalue()


def assert_one_line(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# --- settings: the table, the API, config files -----------------------------------------------------------------

@pytest.mark.parametrize("name, value, message", [
    ("norm_weight", "abc", "EncoreConfig.norm_weight must be a finite number ≥ 0, got 'abc'"),
    ("regularizer_scale", "abs", "EncoreConfig.regularizer_scale must be one of 'relative', 'absolute'"),
    ("v_num_grad_steps", 2.5, "EncoreConfig.v_num_grad_steps must be an integer ≥ 1"),
    ("v_num_grad_steps", True, "EncoreConfig.v_num_grad_steps must be an integer ≥ 1, got True"),
    ("norm_weight", math.inf, "EncoreConfig.norm_weight must be a finite number"),
    ("norm_weight", 10**400, "EncoreConfig.norm_weight must be a finite number"),
    ("layers", "13", "EncoreConfig.layers must be None or a non-empty list"),
    ("layers", 13, "EncoreConfig.layers must be None or a non-empty list"),
    ("layers", [1.9], "EncoreConfig.layers"),
    ("layers", [4, 4], "distinct"),
    ("layers", [-1], "EncoreConfig.layers"),
    ("layers", [], "non-empty"),
    ("mpes", "no", "EncoreConfig.mpes must be true or false, got 'no'"),
    ("mpes", 1, "EncoreConfig.mpes must be true or false"),
    ("stats_n_tokens", math.nan, "EncoreConfig.stats_n_tokens must be None or an integer ≥ 1"),
    ("seed", math.nan, "EncoreConfig.seed must be an integer ≥ 0"),
    ("seed", 2**70, "(a 64-bit integer)"),
    ("clamp_norm_factor", math.inf, "EncoreConfig.clamp_norm_factor must be a finite number > 0"),
    ("max_norm_ratio", 1.0, "EncoreConfig.max_norm_ratio must be None or a finite number > 1"),
    ("max_norm_ratio", math.nan, "EncoreConfig.max_norm_ratio"),
    ("method", ["memit"], "EncoreConfig.method must be one of"),
    ("target_modules", 3, "EncoreConfig.target_modules"),
    ("base_model_parts_fingerprint", {"a": 1}, "EncoreConfig.base_model_parts_fingerprint"),
])
def test_a_bad_setting_is_named(name, value, message):
    with pytest.raises(ValueError) as info:
        EncoreConfig(**{name: value})
    assert message in str(info.value)
    with pytest.raises(ValueError, match=f"EncoreConfig.{name}"):
        EncoreConfig().with_overrides(**{name: value}) if name not in ("layers", "target_modules",
                                                                        "base_model_parts_fingerprint") \
            else EncoreConfig(**{name: value})


def test_valid_settings_are_kept_and_ints_serve_as_floats():
    config = EncoreConfig(norm_weight=1, layers=(3, 5), max_norm_ratio=1.5, stats_n_tokens=None, mpes=True)
    assert config.norm_weight == 1 and config.layers == [3, 5] and config.max_norm_ratio == 1.5
    import numpy as np
    config = EncoreConfig(seed=np.int64(3), norm_weight=np.float32(0.5), layers=[np.int64(2)])
    json.dumps(config.to_dict(), default=str)  # numpy scalars become Python numbers
    assert type(config.seed) is int and type(config.norm_weight) is float and type(config.layers[0]) is int


def test_edit_overrides_are_checked_before_anything_runs():
    from tiny_models import tiny_adapter

    model = tiny_adapter(0)
    with pytest.raises(ValueError, match="EncoreConfig.norm_weight must be a finite number"):
        model.edit(REQUESTS, norm_weight="abc")
    with pytest.raises(ValueError, match="EncoreConfig.v_num_grad_steps"):
        model.edit(REQUESTS, v_num_grad_steps=True)


def test_a_config_file_with_a_bad_setting_is_refused(tmp_path):
    from tiny_models import tiny_adapter

    tiny_adapter(0).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["norm_weight"] = "abc"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="EncoreConfig.norm_weight must be a finite number"):
        EncoreConfig.from_pretrained(str(tmp_path))


SETTING_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-3, max_value=70), st.floats(), st.floats(min_value=-2, max_value=100),
    st.text(max_size=12), st.sampled_from(["encore", "memit", "alphaedit", "relative", "absolute", "13", "NaN"]),
    st.lists(st.integers(min_value=-2, max_value=40), max_size=5),
    st.lists(st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.integers()), max_size=4),
    st.tuples(st.integers(min_value=0, max_value=30)),
    st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), st.integers()), max_size=3),
)


@settings(max_examples=1500, deadline=None)
@given(name=st.sampled_from(sorted(SETTINGS)), value=SETTING_VALUES)
def test_property_every_setting_is_checked(name, value):
    try:
        config = EncoreConfig(**{name: value})
    except (ValueError, TypeError) as err:
        assert f"EncoreConfig.{name}" in str(err), (name, value, err)
        with pytest.raises(ValueError):  # refused by the table itself, not by something further on
            check_given_setting(name, value)
        CASES["settings", "refused, named"] += 1
        return
    kept = getattr(config, name)
    assert check_setting(name, kept) == kept  # what is kept satisfies the table
    CASES["settings", "accepted"] += 1


# --- settings from the command line -----------------------------------------------------------------------------

@pytest.fixture
def request_file(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(REQUESTS))
    return path


@pytest.mark.parametrize("setting, fragment", [
    ("norm_weight=abc", "EncoreConfig.norm_weight must be a finite number ≥ 0, got 'abc'"),
    ("regularizer_scale=abs", "EncoreConfig.regularizer_scale"),
    ("v_num_grad_steps=2.5", "EncoreConfig.v_num_grad_steps"),
    ("v_num_grad_steps=true", "EncoreConfig.v_num_grad_steps"),
    ("norm_weight=Infinity", "EncoreConfig.norm_weight"),
    ('layers="13"', "EncoreConfig.layers"),
    ("layers=13", "EncoreConfig.layers"),
    ("layers=[1.9]", "EncoreConfig.layers"),
    ('mpes="no"', "EncoreConfig.mpes"),
    ("mpes=no", "EncoreConfig.mpes"),
    ("stats_n_tokens=NaN", "EncoreConfig.stats_n_tokens"),
    ("seed=NaN", "EncoreConfig.seed"),
    ("clamp_norm_factor=inf", "EncoreConfig.clamp_norm_factor"),
    ("max_norm_ratio=0.5", "EncoreConfig.max_norm_ratio"),
    ("norm_wieght=0.1", "did you mean norm_weight?"),
    ("=3", "KEY=VALUE"),
])
def test_cli_set_errors_exit_2_before_a_model_loads(request_file, tmp_path, no_model, setting, fragment):
    code, err = run_cli(["edit", str(request_file), "--out", str(tmp_path / "out"), "--set", setting])
    assert code == 2
    assert_one_line(err, "hf-encore edit: error:", fragment)


def test_cli_set_layers_is_taken_for_a_new_adapter(request_file, tmp_path, no_model):
    assert run_cli(["edit", str(request_file), "--out", str(tmp_path / "a"), "--set", "layers=[1, 2]"])[0] == "load"
    code, err = run_cli(["edit", str(request_file), "--out", str(tmp_path / "b"), "--layers", "1",
                         "--set", "layers=[2]"])
    assert code == 2
    assert_one_line(err, "give the layers once")


def test_bench_set_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--set", "norm_weight=abc"])
    assert info.value.code == 2
    assert "EncoreConfig.norm_weight" in capsys.readouterr().err


SET_TEXTS = st.one_of(
    st.text(max_size=15),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1", "0", "2.5", "true", "null", "[]", "{}", "[1.9]",
                     '"13"', "[1, 1]", "[0, 3]", "1e-9", "-0.0", "[true]", '{"a": 1}', "9223372036854775808"]),
    st.floats().map(repr), st.integers().map(str),
    st.lists(st.integers(min_value=-2, max_value=40), max_size=4).map(json.dumps),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(SETTINGS)), text=SET_TEXTS)
def test_property_cli_set_never_tracebacks(request_file, tmp_path, no_model, name, text):
    code, err = run_cli(["edit", str(request_file), "--out", str(tmp_path / "out"), "--set", f"{name}={text}"])
    CASES["cli --set", f"exit {code}"] += 1
    if "Traceback" in err:
        CASES["cli --set", "tracebacks"] += 1
    if code == "load":  # a valid value: the command went on to load the model
        check_given_setting(name, parse_value(text))
        return
    assert code == 2, (name, text, code, err)
    assert_one_line(err, "hf-encore edit: error:")


# --- numeric options ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["edit", "r.json", "--out", "x", "--limit", "-1"],
    ["edit", "r.json", "--out", "x", "--limit", "0"],
    ["edit", "r.json", "--out", "x", "--batch-size", "0"],
    ["edit", "r.json", "--out", "x", "--batch-size", "2.5"],
    ["edit", "r.json", "--out", "x", "--layers", "3", "-1"],
    ["ask", "x", "--max-new-tokens", "0"],
    ["eval", "--counterfact", "--items", "0"],
    ["eval", "--counterfact", "--limit", "-5"],
    ["stats", "--tokens", "0"],
    ["stats", "--layers", "-2"],
    ["show", "adapter", "--last", "0"],
    ["show", "adapter", "--requests", "-1"],
    ["push", "adapter", "me/x", "--timeout", "0"],
    ["push", "adapter", "me/x", "--timeout", "nan"],
    ["push", "adapter", "me/x", "--timeout", "inf"],
    ["push", "adapter", "me/x", "--timeout", "soon"],
])
def test_numeric_options_out_of_range_exit_2(argv, no_model):
    code, err = run_cli(argv)
    option = next(a for a in reversed(argv) if a.startswith("--"))
    assert code == 2
    assert f"argument {option}: must be" in err and "Traceback" not in err


def test_limit_is_checked_by_the_api_too(request_file):
    with pytest.raises(ValueError, match="limit must be None or a positive integer"):
        load_requests(request_file, limit=-1)
    assert len(load_requests(request_file, limit=1)) == 1


# --- request files and other text the user supplies -------------------------------------------------------------

CSV = "prompt,subject,target_new\n{} plays the sport of,LeBron James,football\n"


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "requests.csv"
    path.write_bytes(b"\xef\xbb\xbf" + CSV.encode())
    assert load_requests(path) == [REQUESTS[0]]


@pytest.mark.parametrize("data, fragment", [
    (CSV.replace("football", "caf\xe9").encode("latin-1"),
     f"not UTF-8 text (byte 0xe9 at offset {CSV.index('football') + 3}); save it as UTF-8"),
    (CSV.encode("utf-16"), "UTF-16 text, not UTF-8; save it as UTF-8"),
])
def test_other_encodings_are_named_with_the_fix(tmp_path, data, fragment):
    path = tmp_path / "requests.csv"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        load_requests(path)
    assert str(info.value) == f"{path}: {fragment}"


def test_counterfact_and_corpus_use_the_same_reader(tmp_path):
    from hf_encore.editing.corpus import read_corpus

    latin = tmp_path / "cf.json"
    latin.write_bytes(json.dumps([{"prompt": "x é", "subject": "x", "target_new": "y", "ground_truth": "z"}],
                                 ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"cf.json: not UTF-8 text \(byte 0xe9"):
        load_counterfact(latin)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("caf\xe9 au lait\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"corpus.txt: not UTF-8 text"):
        read_corpus(corpus)
    corpus.write_bytes("\ufeffFirst line\nSecond line\n".encode())
    assert read_corpus(corpus).texts[0] == "First line"
    assert read_user_text(corpus).startswith("First")


def test_cli_edit_on_a_latin1_file_is_one_line(tmp_path, no_model):
    path = tmp_path / "requests.csv"
    path.write_bytes(CSV.replace("football", "caf\xe9").encode("latin-1"))
    code, err = run_cli(["edit", str(path), "--out", str(tmp_path / "out")])
    assert code == 2
    assert_one_line(err, "requests.csv: not UTF-8 text", "save it as UTF-8")


def _csv_bytes(draw_rows, bom: bool, encoding: str) -> bytes:
    text = "\n".join(",".join(row) for row in draw_rows)
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding, errors="replace")


CELL = st.text(alphabet=st.characters(max_codepoint=300, exclude_categories=("Cs",)), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
RECORD = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.sampled_from(["{} plays", "LeBron plays", "{} and {}", ""]), CELL, st.integers()),
    "subject": st.one_of(st.sampled_from(["LeBron", ""]), CELL, st.none()),
    "target_new": st.one_of(st.sampled_from(["golf", " "]), CELL, st.lists(CELL, max_size=1)),
    "ground_truth": CELL, "target_true": st.one_of(CELL, st.integers()),
    "requested_rewrite": st.one_of(JSON_VALUES, st.fixed_dictionaries(
        {"prompt": st.sampled_from(["{} plays", "x"]), "subject": CELL, "target_new": st.one_of(JSON_VALUES, CELL)})),
    "src": CELL, "alt": st.one_of(CELL, st.integers())})
def _as_csv(records: list[dict], bom: bool) -> bytes:
    import csv

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["prompt", "subject", "target_new"])
    writer.writeheader()
    writer.writerows(records)
    return (b"\xef\xbb\xbf" if bom else b"") + out.getvalue().encode()


# Mostly well-formed requests (the targets are arbitrary text), so that the accepting path is exercised too.
PLAUSIBLE = st.lists(st.fixed_dictionaries({
    "prompt": st.sampled_from(["{} plays the sport of", "LeBron plays", "{} is", "Where is LeBron?"]),
    "subject": st.sampled_from(["LeBron", "LeBron James"]), "target_new": CELL}), min_size=1, max_size=3)
FILE_CONTENTS = st.one_of(
    PLAUSIBLE.map(lambda rs: json.dumps(rs).encode()),
    PLAUSIBLE.map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()),
    st.builds(_as_csv, PLAUSIBLE, st.booleans()),
    st.binary(max_size=120),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.lists(RECORD, max_size=4).map(lambda rs: json.dumps(rs, ensure_ascii=False).encode()),
    st.lists(RECORD, min_size=1, max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()),
    st.builds(_csv_bytes,
              st.lists(st.lists(st.one_of(CELL, st.sampled_from(["prompt", "subject", "target_new", "{} plays"])),
                                min_size=1, max_size=4), max_size=4),
              st.booleans(), st.sampled_from(["utf-8", "latin-1", "utf-16", "cp1252"])),
)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=FILE_CONTENTS, suffix=st.sampled_from([".json", ".jsonl", ".csv", ".txt"]),
       limit=st.sampled_from([None, 1, 3]))
def test_property_request_files_never_crash(tmp_path, data, suffix, limit):
    path = tmp_path / f"requests{suffix}"
    path.write_bytes(data)
    try:
        requests = load_requests(path, limit=limit)
    except (ValueError, FileNotFoundError) as err:
        assert path.name in str(err), err
        CASES["request files", type(err).__name__] += 1
        return
    assert requests and (limit is None or len(requests) <= limit)
    for request in requests:
        assert set(request) <= {"prompt", "subject", "target_new", "target_true"}
        assert request["prompt"].count("{}") == 1
        assert all(isinstance(request[k], str) and request[k].strip() for k in ("subject", "target_new"))
    CASES["request files", "valid requests"] += 1


# --- adapters hf_encore cannot read -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from tiny_models import tiny_adapter

    directory = tmp_path_factory.mktemp("adapter") / "edits"
    tiny_adapter(0).save_pretrained(directory)
    return directory


def _edited_copy(saved: Path, target: Path, file: str, key: str, value, keep_manifest: bool = False) -> Path:
    shutil.copytree(saved, target)
    data = json.loads((target / file).read_text())
    data[key] = value
    (target / file).write_text(json.dumps(data))
    if not keep_manifest:  # a hand-edited file fails the checksum first; without the manifest its content is read
        (target / "encore_manifest.json").unlink(missing_ok=True)
    return target


@pytest.mark.parametrize("file, key, value, fragment", [
    ("adapter_config.json", "peft_type", "LORA", "peft_type is 'LORA'"),
    ("encore_state.json", "format_version", "2", "format_version must be a positive integer, got '2'"),
    ("encore_state.json", "format_version", 99, "written by a newer hf_encore"),
    ("adapter_config.json", "norm_weight", "abc", "EncoreConfig.norm_weight"),
    ("adapter_config.json", "layers", "13", "EncoreConfig.layers"),
])
@pytest.mark.parametrize("keep_manifest", [False, True])
def test_show_names_the_file_and_the_problem(saved_adapter, tmp_path, no_model, file, key, value, fragment,
                                             keep_manifest):
    copy = _edited_copy(saved_adapter, tmp_path / "copy", file, key, value, keep_manifest)
    code, err = run_cli(["show", str(copy)])
    assert code == 2
    assert_one_line(err, "hf-encore show: error:", str(copy / file), *(() if keep_manifest else (fragment,)))


def test_ask_on_a_lora_adapter_is_one_line(saved_adapter, tmp_path):
    copy = _edited_copy(saved_adapter, tmp_path / "copy", "adapter_config.json", "peft_type", "LORA")
    code, err = run_cli(["ask", "x", "--adapter", str(copy)])
    assert code == 2
    assert_one_line(err, "hf-encore ask: error:", "adapter_config.json", "peft_type is 'LORA'")


@pytest.mark.parametrize("line", ["{not json", '{"batch": 1}', '[1, 2]',
                                  '{"batch": 1, "method": "memit", "time": 1e300, "requests": [], '
                                  '"report": {"requests": [{}], "layers": [{}]}}'])
def test_show_reads_a_damaged_ledger_as_one_line_or_shows_it(saved_adapter, tmp_path, no_model, line):
    copy = tmp_path / "copy"
    shutil.copytree(saved_adapter, copy)
    (copy / "encore_manifest.json").unlink(missing_ok=True)
    (copy / "encore_ledger.jsonl").write_text(line + "\n")
    code, err = run_cli(["show", str(copy)])
    if code == 0:  # a well-formed entry with odd values is listed, with "?" for what cannot be shown
        assert line.startswith('{"batch": 1, "method"')
        return
    assert code == 2
    assert_one_line(err, "hf-encore show: error:", "encore_ledger.jsonl")


# --- merge --out, eval inputs -------------------------------------------------------------------------------------

def test_merge_refuses_an_existing_file_or_non_empty_directory(tmp_path, no_model):
    existing = tmp_path / "model.bin"
    existing.write_text("x")
    code, err = run_cli(["merge", "--adapter", "a", "--out", str(existing)])
    assert code == 2
    assert_one_line(err, "is an existing file")
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    code, err = run_cli(["merge", "--adapter", "a", "--out", str(full)])
    assert code == 2
    assert_one_line(err, "non-empty directory", "remove it first")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["merge", "--adapter", "a", "--out", str(empty)])[0] == "load"
    assert run_cli(["merge", "--adapter", "a", "--out", str(tmp_path / "new")])[0] == "load"


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "--counterfact", "{tmp}/absent.json"], "absent.json"),
    (["eval", "--zsre", "{tmp}/absent.json"], "absent.json"),
    (["eval", "--downstream", "{tmp}", "--tasks", "nope"], "unknown task(s) nope"),
    (["eval", "--downstream", "{tmp}/absent"], "downstream task directory not found"),
    (["eval", "--counterfact", "{tmp}/r.json"], "case 0 is not a CounterFact case"),
    (["eval", "--counterfact", "{tmp}/r.json", "--json", "{tmp}/no/such/dir/out.json"], "its directory does not exist"),
])
def test_eval_inputs_are_checked_before_the_model_loads(tmp_path, no_model, argv, fragment):
    (tmp_path / "r.json").write_text(json.dumps([{"prompt": 3}]))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--json" in argv:
        (tmp_path / "r.json").write_text(json.dumps([{"prompt": "s x", "subject": "s", "target_new": "t",
                                                      "ground_truth": "g"}]))
    code, err = run_cli(argv)
    assert code == 2
    assert_one_line(err, "hf-encore eval: error:", fragment)


# --- push: timeouts and transport errors ---------------------------------------------------------------------------

@contextlib.contextmanager
def silent_server(lifetime: float = 15.0):
    """A loopback endpoint that accepts connections and never answers; it stops when the block ends, or by itself
    after ``lifetime`` seconds."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.05)
    stop = threading.Event()

    def hold_connections():
        held = []
        deadline = time.monotonic() + lifetime
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(server.accept()[0])
            except OSError:  # the accept timed out: look at the clock again
                pass
        for connection in held:
            connection.close()
        server.close()

    thread = threading.Thread(target=hold_connections, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=2)


def refused_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: nothing listens there


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def tiny_model_for_push(monkeypatch):
    from tiny_models import tiny_adapter

    model = tiny_adapter(0)
    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: (model, None))
    return model


@pytest.mark.parametrize("kind", ["silent", "refused"])
def test_push_to_an_unreachable_endpoint_is_one_line(online, tiny_model_for_push, kind):
    from huggingface_hub.utils import _http

    factory = _http._GLOBAL_CLIENT_FACTORY
    start = time.monotonic()
    with silent_server() if kind == "silent" else contextlib.nullcontext(refused_endpoint()) as endpoint:
        code, err = run_cli(["push", "adapter", "me/edits", "--endpoint", endpoint, "--token", "hf_x",
                             "--timeout", "0.5"])
    assert time.monotonic() - start < 5
    assert code == 2
    assert_one_line(err, "hf-encore push: error:", endpoint, "did not answer within 0.5 s" if kind == "silent"
                    else "cannot reach")
    assert _http._GLOBAL_CLIENT_FACTORY is factory  # the user's client settings are restored


def test_push_api_raises_a_connection_error_naming_the_endpoint(online, tiny_model_for_push):
    import hf_encore
    from hf_encore.hub import HubConnectionError

    with silent_server() as endpoint, pytest.raises(HubConnectionError, match=endpoint):
        hf_encore.push_to_hub(tiny_model_for_push, "me/edits", endpoint=endpoint, token="hf_x", timeout=0.3)
    with pytest.raises(ValueError, match="timeout must be None or a positive number"):
        hf_encore.push_to_hub(tiny_model_for_push, "me/edits", timeout=0)


def test_push_uploads_no_hidden_encore_files(online, tiny_model_for_push, monkeypatch):
    import hf_encore

    from fake_hub import FakeHub

    model = tiny_model_for_push
    save = model.save_pretrained

    def save_with_a_lock(directory, **kwargs):  # whatever save itself writes, a lock file is there
        save(directory, **kwargs)
        (Path(directory) / ".encore.lock").write_text("")
        (Path(directory) / ".encore-tmp").write_text("")

    monkeypatch.setattr(model, "save_pretrained", save_with_a_lock)
    with FakeHub() as hub:
        hf_encore.push_to_hub(model, "me/edits", endpoint=hub.endpoint, token="hf_x", timeout=10)
    files = set(hub.repos["me/edits"])
    assert "adapter_config.json" in files and not any(Path(f).name.startswith(".encore") for f in files), files
