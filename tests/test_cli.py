"""The ``hf-encore`` command line: request files in every accepted format, one-line errors, and each subcommand on
the tiny random Llama of tiny_models.py saved as a model directory (``--model``); ``ask`` on the real SmolLM2 (slow:
the edited model must say the new fact)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_encore.apps.cli import main
from hf_encore.apps.options import parse_settings
from hf_encore.data import load_requests

SPORTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
    {"prompt": "Serena Williams plays the sport of", "subject": "Serena Williams", "target_new": "golf"},
]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- request files -----------------------------------------------------------------------------------------------

def test_request_files_in_every_format_give_the_same_requests(tmp_path):
    expected = [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
                {"prompt": "{} plays the sport of", "subject": "Serena Williams", "target_new": "golf"}]
    (tmp_path / "a.json").write_text(json.dumps(SPORTS))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in SPORTS) + "\n")
    write_csv(tmp_path / "c.csv", SPORTS)
    easyedit = [{"prompt": "LeBron James plays the sport of", "subject": "LeBron James", "target_new": "football",
                 "ground_truth": "basketball"}]
    (tmp_path / "d.json").write_text(json.dumps(easyedit))
    rome = [{"case_id": 0, "requested_rewrite": {"prompt": "{} plays the sport of", "subject": "LeBron James",
                                                 "target_new": {"str": "football"},
                                                 "target_true": {"str": "basketball"}}}]
    (tmp_path / "e.json").write_text(json.dumps(rome))
    zsre = [{"subject": "LeBron James", "src": "What sport does LeBron James play?", "alt": "football",
             "answers": ["basketball"], "rephrase": "x", "loc": "y", "loc_ans": "z"}]
    (tmp_path / "f.json").write_text(json.dumps(zsre))
    for name in ("a.json", "b.jsonl", "c.csv"):
        assert load_requests(tmp_path / name) == expected
    with_truth = dict(expected[0], target_true="basketball")
    assert load_requests(tmp_path / "d.json") == [with_truth]
    assert load_requests(tmp_path / "e.json") == [with_truth]
    assert load_requests(tmp_path / "f.json") == [
        {"prompt": "What sport does {} play?", "subject": "LeBron James", "target_new": "football"}]
    assert load_requests(tmp_path / "a.json", limit=1) == expected[:1]


def test_bad_request_files_name_the_file_and_record(tmp_path):
    (tmp_path / "bad.json").write_text("[{\"prompt\": \"x\"")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_requests(tmp_path / "bad.json")
    (tmp_path / "missing.jsonl").write_text(json.dumps(SPORTS[0]) + "\n" + json.dumps({"prompt": "{} is"}) + "\n")
    with pytest.raises(ValueError, match=r"missing.jsonl, line 2: missing or empty field\(s\) \['subject', "):
        load_requests(tmp_path / "missing.jsonl")
    write_csv(tmp_path / "nosubject.csv", [{"prompt": "He plays", "subject": "LeBron James", "target_new": "x"}])
    with pytest.raises(ValueError, match="nosubject.csv, row 2: the prompt 'He plays' has neither"):
        load_requests(tmp_path / "nosubject.csv")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no requests"):
        load_requests(tmp_path / "empty.json")
    with pytest.raises(FileNotFoundError, match="request file not found"):
        load_requests(tmp_path / "absent.json")


def test_settings_are_read_as_json_values():
    assert parse_settings(["norm_weight=0.1", "mpes=false", "method=memit", "layers=[1, 2]"]) == {
        "norm_weight": 0.1, "mpes": False, "method": "memit", "layers": [1, 2]}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["norm_weight"])


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["edit", "{tmp}/absent.json", "--out", "{tmp}/x"], "request file not found"),
    (["edit", "{tmp}/requests.json"], "--out is required"),
    (["edit", "{tmp}/requests.json", "--out", "{tmp}/x", "--set", "no_such_setting=1"], "no_such_setting"),
    (["show", "{tmp}/absent"], "adapter directory not found"),
    (["show", "{tmp}"], "adapter_config.json: missing"),
    (["eval", "--model", "{tmp}/absent"], ""),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "requests.json").write_text(json.dumps(SPORTS))
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"hf-encore {argv[0]}: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "requests.json", "--out", "x", "--method", "rome"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'rome'" in capsys.readouterr().err


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--verbose", "edit", str(tmp_path / "absent.json"), "--out", str(tmp_path / "x")])


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: 15 s
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "hf-encore"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("edit", "ask", "eval", "stats", "show", "merge", "push", "bench"):
        assert command in out


# --- the subcommands ----------------------------------------------------------------------------------------------

def edit_sports(tmp: Path, model_dir: Path, corpus: Path) -> Path:
    write_csv(tmp / "sports.csv", SPORTS)
    out = tmp / "edits"
    code = main(["edit", str(tmp / "sports.csv"), "--model", str(model_dir), "--out", str(out), "--quiet",
                 "--corpus", str(corpus), "--set", "v_num_grad_steps=15", "--set", "stats_n_tokens=3000"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_dir):
    """SPORTS written by ``hf-encore edit`` into the tiny model (all four layers, the default for four)."""
    return edit_sports(tmp_path_factory.mktemp("cli"), tiny_dir, tiny_dir / "corpus.txt")


@pytest.fixture(scope="module")
def real_adapter_dir(tmp_path_factory, smollm2_dir, corpus_path):
    """SPORTS written by ``hf-encore edit`` into SmolLM2."""
    return edit_sports(tmp_path_factory.mktemp("cli-real"), smollm2_dir, corpus_path)


def test_edit_writes_an_adapter_and_show_reads_it(adapter_dir, capsys):
    meta = json.loads((adapter_dir / "encore_state.json").read_text())
    assert meta["num_edits"] == 2 and meta["num_batches"] == 1
    assert main(["show", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "num_edits: 2" in out and "LeBron James plays the sport of → football" in out
    assert "base_model_fingerprint:" in out and "delta_norms:" in out
    assert main(["show", str(adapter_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["num_edits"] == 2 and len(shown["ledger"]) == 1
    assert all(v > 0 for v in shown["delta_norms"].values())
    assert shown["settings"]["mpes"] is True


@pytest.mark.slow
def test_ask_shows_the_edit_before_and_after(real_adapter_dir, capsys):
    assert main(["ask", "LeBron James plays the sport of", "--adapter", str(real_adapter_dir),
                 "--target", " football", "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    p = {line.split(":")[0].strip(): float(line.rsplit("=", 1)[1]) for line in lines[1:]}
    assert p["edited"] > 0.5 > p["base"]


def test_edit_continues_an_adapter_and_merge_exports_it(adapter_dir, tiny_dir, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    import hf_encore

    copy = tmp_path / "edits"
    shutil.copytree(adapter_dir, copy)
    (tmp_path / "more.json").write_text(json.dumps([
        {"prompt": "{} was developed by", "subject": "Windows 95", "target_new": "Apple"}]))
    assert main(["edit", str(tmp_path / "more.json"), "--model", str(tiny_dir), "--adapter", str(copy),
                 "--quiet", "--set", "v_num_grad_steps=15"]) == 0
    assert "3 in the adapter, 2 batches" in capsys.readouterr().out
    assert main(["merge", "--model", str(tiny_dir), "--adapter", str(copy), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    base, tokenizer = hf_encore.load_model(str(tiny_dir))
    with_adapter = hf_encore.from_pretrained(base, copy)
    ids = tokenizer("Windows 95 was developed by", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, with_adapter(**ids).logits, rtol=1e-4, atol=1e-4)


def test_wrong_base_is_one_clear_error(adapter_dir, tiny_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "edits"
    shutil.copytree(adapter_dir, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_fingerprint"] = "0" * 16
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (copy / "encore_manifest.json").unlink()  # edited by hand: else the checksum, not the base, is what is refused
    assert main(["ask", "x", "--model", str(tiny_dir), "--adapter", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "hf-encore ask: error:" in err and "Traceback" not in err and "another base model" in err
    assert main(["ask", "x", "--model", str(tiny_dir), "--adapter", str(copy), "--ignore-base-mismatch",
                 "--max-new-tokens", "1"]) == 0


def test_push_uploads_the_adapter(adapter_dir, tiny_dir, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    from fake_hub import FakeHub

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as hub:
        assert main(["push", str(adapter_dir), "team/cli-edits", "--model", str(tiny_dir), "--token", "hf_x",
                     "--endpoint", hub.endpoint]) == 0
    files = hub.repos["team/cli-edits"]
    assert {"adapter_config.json", "adapter_model.safetensors", "encore_state.json", "README.md"} <= set(files)
    assert "pushed to" in capsys.readouterr().out


def test_eval_and_stats(adapter_dir, tiny_dir, shared_data, tmp_path, capsys):
    import hf_encore
    from hf_encore.data import load_counterfact
    from hf_encore.evaluation import counterfact_scores, weight_norms

    assert main(["eval", "--model", str(tiny_dir), "--adapter", str(adapter_dir), "--counterfact", "--limit", "3",
                 "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    # The figures are those of the API on the same adapter and the first three cases.
    base, tokenizer = hf_encore.load_model(str(tiny_dir))
    model = hf_encore.from_pretrained(base, adapter_dir, tokenizer=tokenizer)
    expected = counterfact_scores(model, tokenizer, load_counterfact(None, limit=3))
    assert results["counterfact"] == pytest.approx({k: v for k, v in expected.items() if k != "per_case"})
    assert set(results["norms"]) == {"0", "1", "2", "3"}
    assert results["norms"] == {str(k): v for k, v in weight_norms(model).items()}
    capsys.readouterr()
    assert main(["stats", "--model", str(tiny_dir), "--corpus", str(tiny_dir / "corpus.txt"), "--tokens", "3000",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(64, 64)" in out
