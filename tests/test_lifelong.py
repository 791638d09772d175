"""The lifelong benchmark runner end to end on a tiny run, stopped and continued."""

from __future__ import annotations

import json

import pytest

from hf_encore.lifelong import EvalSettings, LifelongSettings, is_eval_point, method_config, parse_args, run


def test_tiny_run_resumes_and_writes_logs_plots_and_summary(smollm2_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path / "cache"))
    settings = LifelongSettings(
        model=str(smollm2_dir), methods=("encore",), edits=10, batch_size=5, eval_every=10, out=str(tmp_path / "run"),
        config={"layers": [3, 4], "stats_n_tokens": 2048, "v_num_grad_steps": 3, "n_context_templates": 2},
        evaluation=EvalSettings(downstream_tasks=("sst2",), downstream_items=4, downstream_shots=1,
                                perplexity_tokens=256, known_facts=5, edited_sample=6))
    out = run(settings, progress=False)
    log_path = out / "encore" / "log.jsonl"
    first = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["kind"], r["num_edits"]) for r in first] == [
        ("eval", 0), ("batch", 5), ("batch", 10), ("eval", 10), ("final", 10)]
    # A stop after work that was never saved: its records must not survive the restart.
    with open(log_path, "a") as f:
        f.write(json.dumps({"kind": "batch", "method": "encore", "num_edits": 15, "elapsed_seconds": 1.0}) + "\n")

    settings.edits = 20
    run(settings, progress=False)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["kind"], r["num_edits"]) for r in records] == [
        ("eval", 0), ("batch", 5), ("batch", 10), ("eval", 10), ("final", 10), ("batch", 15), ("batch", 20),
        ("eval", 20), ("final", 20)]
    state = json.loads((out / "encore" / "adapter" / "encore_state.json").read_text())
    assert state["num_edits"] == 20 and state["num_batches"] == 4
    last = records[-2]
    assert last["edit_metrics"]["n"] == 6 and 0 <= last["edit_metrics"]["ES"] <= 1
    assert set(last["norms"]) == {"3", "4"} and all(v["norm_ratio"] > 0 for v in last["norms"].values())
    assert last["perplexity"] > 1 and last["retained_knowledge"] is not None
    unedited = json.loads((out / "unedited.json").read_text())
    assert unedited["num_edits"] == 0 and "mean_f1" in unedited["downstream"]
    first = records[0]  # no edits yet: the unedited figures, not a second evaluation of the same model
    assert first["perplexity"] == unedited["perplexity"] and first["downstream"] == unedited["downstream"]
    assert all(v["norm_ratio"] == 1.0 and v["delta_norm"] == 0.0 for v in first["norms"].values())
    summary = (out / "summary.md").read_text()
    assert "| unedited | 0 |" in summary and "| encore | 20 |" in summary
    for png in ("downstream.png", "perplexity.png", "retained.png", "norms.png", "edit_metrics.png"):
        assert (out / png).stat().st_size > 1000


def test_arguments_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="only '\\+mpes'"):
        method_config("memit+fast", {})
    with pytest.raises(SystemExit):
        parse_args(["--batch-size", "0"])
    settings = LifelongSettings(edits=1000, batch_size=100, eval_every=250)
    assert [n for n in range(0, 1001, 100) if is_eval_point(n, settings)] == [0, 300, 500, 800, 1000]
    settings, _ = parse_args(["--methods", "alphaedit+mpes", "--set", "norm_weight=0.2", "--edits", "200"])
    assert settings.methods == ("alphaedit+mpes",) and settings.config == {"norm_weight": 0.2}
    config = method_config("alphaedit+mpes", settings.config)
    assert config.mpes and config.nullspace_projection and config.norm_weight == 0.2
    with pytest.raises(SystemExit):
        parse_args(["--set", "norm_weight"])  # not KEY=VALUE
    settings, _ = parse_args(["--device", "cpu", "--set", "max_tokens_per_forward=32768", "--set", "layers=[4, 5]"])
    assert settings.device == "cpu" and settings.config == {"max_tokens_per_forward": 32768, "layers": [4, 5]}
