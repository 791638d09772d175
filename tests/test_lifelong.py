"""The lifelong benchmark runner end to end on a tiny run (the tiny random Llama of tiny_models.py, the shared
data), stopped and continued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_encore.apps.lifelong import (
    EvalSettings,
    LifelongSettings,
    choose_edits,
    is_eval_point,
    method_config,
    parse_args,
    run,
)


def facts_the_model_knows(model_dir: Path, shared_data: Path, out: Path, count: int = 8) -> Path:
    """A CounterFact file of probe facts for retained knowledge: counterfact-train cases whose true object is
    replaced by the model's own greedy next word (a random model knows almost none of the real ones: finding 5 took a
    scan of all 10,000 cases)."""
    from hf_encore.loading import load_model

    model, tokenizer = load_model(str(model_dir))
    raw = json.loads((shared_data / "counterfact" / "counterfact-train.json").read_text(encoding="utf-8"))
    known = []
    for case in raw[:100]:
        with torch.no_grad():
            logits = model(**tokenizer(case["prompt"], return_tensors="pt")).logits[0, -1]
        word = tokenizer.decode([int(logits.argmax())])
        if word.startswith(" ") and word.strip().isalpha():  # a whole word: it reads back as this one token
            known.append({**case, "ground_truth": word.strip()})
        if len(known) == count:
            break
    assert len(known) == count
    path = out / "probe.json"
    path.write_text(json.dumps(known), encoding="utf-8")
    return path


def tiny_run_settings(tiny_dir: Path, shared_data: Path, tmp_path: Path, edits: int, batch_size: int,
                      eval_every: int, **evaluation) -> LifelongSettings:
    """A short ENCORE run on the tiny model into ``tmp_path / "run"``, probing facts it knows."""
    return LifelongSettings(
        model=str(tiny_dir), methods=("encore",), edits=edits, batch_size=batch_size, eval_every=eval_every,
        out=str(tmp_path / "run"), probe_data=str(facts_the_model_knows(tiny_dir, shared_data, tmp_path)),
        config={"layers": [1, 2], "stats_n_tokens": 2048, "v_num_grad_steps": 3, "n_context_templates": 2},
        evaluation=EvalSettings(**evaluation))


def test_tiny_run_resumes_and_writes_logs_plots_and_summary(tiny_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path / "cache"))
    settings = tiny_run_settings(tiny_dir, shared_data, tmp_path, edits=10, batch_size=5, eval_every=10,
                                 downstream_tasks=("sst2",), downstream_items=4, downstream_shots=1,
                                 perplexity_tokens=256, known_facts=5, edited_sample=6, fluency_sample=3)
    out = run(settings, progress=False)
    log_path = out / "encore" / "log.jsonl"
    first = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["kind"], r["num_edits"]) for r in first] == [
        ("eval", 0), ("batch", 5), ("batch", 10), ("eval", 10), ("final", 10)]
    assert first[-1]["fluency"] > 0
    # A run that finished before fluency was measured gets it when the command runs again, without new edits.
    log_path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "fluency"}) + "\n" for r in first))
    run(settings, progress=False)
    again = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert again[:-1] == first[:-1] and again[-1] == first[-1]  # seeded sampling: the same value again
    # A stop after work that was never saved: its records must not survive the restart.
    with open(log_path, "a") as f:
        f.write(json.dumps({"kind": "batch", "method": "encore", "num_edits": 15, "elapsed_seconds": 1.0}) + "\n")

    # A checkpoint of an evaluation whose model state is gone (past the saved adapter) must not be reused.
    stale = out / "encore" / "eval-15.partial.json"
    stale.write_text(json.dumps({"evaluation": {}, "parts": {}}))

    settings.edits = 20
    run(settings, progress=False)
    assert not stale.exists()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["kind"], r["num_edits"]) for r in records] == [
        ("eval", 0), ("batch", 5), ("batch", 10), ("eval", 10), ("final", 10), ("batch", 15), ("batch", 20),
        ("eval", 20), ("final", 20)]
    state = json.loads((out / "encore" / "adapter" / "encore_state.json").read_text())
    assert state["num_edits"] == 20 and state["num_batches"] == 4
    last = records[-2]
    assert last["edit_metrics"]["n"] == 6
    # The edited model is what was measured: its layers moved, and so did its perplexity.
    assert set(last["norms"]) == {"1", "2"} and all(v["norm_ratio"] != 1.0 and v["delta_norm"] > 0
                                                  for v in last["norms"].values())
    assert last["retained_knowledge"] is not None
    assert last["eval_seconds"] == pytest.approx(sum(last["eval_part_seconds"].values()))
    assert not list(out.rglob("*.partial.json"))  # finished evaluations leave no checkpoint behind
    unedited = json.loads((out / "unedited.json").read_text())
    assert unedited["num_edits"] == 0 and "mean_f1" in unedited["downstream"]
    assert unedited["retained_knowledge"] == 1.0  # the 5 probe facts were chosen as facts the base model knows
    # Fluency prompts: the first edited facts of the fixed order, which grew with the run; the unedited
    # model's GE is from the same prompts as the final one.
    assert len(unedited["fluency_prompts"]) == 3 and unedited["fluency"] > 0 and records[-1]["fluency"] > 0
    first = records[0]  # no edits yet: the unedited figures, not a second evaluation of the same model
    assert first["perplexity"] == unedited["perplexity"] and first["downstream"] == unedited["downstream"]
    assert all(v["norm_ratio"] == 1.0 and v["delta_norm"] == 0.0 for v in first["norms"].values())
    assert last["perplexity"] != unedited["perplexity"]
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
    assert settings.precision == "float32"
    with pytest.raises(SystemExit):
        parse_args(["--precision", "int8"])


def test_the_base_is_loaded_in_the_precision_asked(tiny_dir, shared_data, tmp_path, monkeypatch):
    """``--precision bfloat16``: the base the run measures and edits is the bf16 model (loaded once for the unedited
    evaluation, then once per method), not a float32 one."""
    import hf_encore.loading as loading

    loaded: list[torch.dtype] = []
    real_load = loading.load_model

    def recording_load(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        raise KeyboardInterrupt  # enough seen: stop before any evaluation

    settings, _ = parse_args(["--model", str(tiny_dir), "--methods", "encore", "--precision", "bfloat16",
                              "--out", str(tmp_path / "run")])
    monkeypatch.setattr(loading, "load_model", recording_load)
    with pytest.raises(KeyboardInterrupt):
        run(settings, progress=False)
    assert loaded == [torch.bfloat16]


def test_an_interrupted_evaluation_continues_from_the_measures_it_finished(tmp_path, monkeypatch):
    import hf_encore.evaluation as evaluation
    from hf_encore.apps.lifelong import evaluate_point

    calls: list[str] = []

    def fake(name, value):
        def measure(*args, **kwargs):
            calls.append(name)
            return value
        return measure

    monkeypatch.setattr(evaluation, "load_task", lambda name, directory: [])
    monkeypatch.setattr(evaluation, "evaluate_task", lambda model, tokenizer, task, items, **kw: (
        calls.append(task.name) or {"f1": 0.5 if task.name == "sst2" else 0.25, "f1_likelihood": 0.5}))
    monkeypatch.setattr(evaluation, "retained_knowledge", fake("retained", 0.75))
    monkeypatch.setattr(evaluation, "counterfact_scores", fake("edits", {"ES": 1.0, "per_case": {}}))

    def perplexity_stops(*args, **kwargs):
        calls.append("perplexity")
        raise KeyboardInterrupt  # the session ends here

    monkeypatch.setattr(evaluation, "perplexity", perplexity_stops)
    ev = EvalSettings(downstream_tasks=("sst2", "rte"))
    checkpoint = tmp_path / "eval-100.partial.json"
    kwargs = dict(edited=[{}], probe=[{}], texts=[], downstream_dir=tmp_path, adapter=False, checkpoint=checkpoint)
    with pytest.raises(KeyboardInterrupt):
        evaluate_point(None, None, ev=ev, **kwargs)
    assert calls == ["sst2", "rte", "perplexity"]

    calls.clear()
    monkeypatch.setattr(evaluation, "perplexity", fake("perplexity", 12.5))
    record = evaluate_point(None, None, ev=ev, **kwargs)
    assert calls == ["perplexity", "retained", "edits"]  # the two tasks came from the checkpoint
    assert record["downstream"]["mean_f1"] == pytest.approx(0.375) and record["perplexity"] == 12.5
    assert record["retained_knowledge"] == 0.75 and record["edit_metrics"] == {"ES": 1.0, "n": 1}
    assert set(record["eval_part_seconds"]) == {"downstream/sst2", "downstream/rte", "perplexity",
                                                "retained_knowledge", "edit_metrics"}

    calls.clear()  # other settings: nothing in the checkpoint is theirs
    evaluate_point(None, None, ev=EvalSettings(downstream_tasks=("sst2", "rte"), downstream_items=50), **kwargs)
    assert calls == ["sst2", "rte", "perplexity", "retained", "edits"]


def test_edits_drawn_from_the_probe_file_never_include_a_probe_fact():
    cases = [{"case_id": i} for i in range(10)]
    probe = [cases[i] for i in (1, 4, 7)]
    chosen = choose_edits(cases, probe, 7, seed=0)
    assert sorted(c["case_id"] for c in chosen) == [0, 2, 3, 5, 6, 8, 9]
    with pytest.raises(ValueError, match="7 cases that are not probe facts; 8 edits"):
        choose_edits(cases, probe, 8, seed=0)
    # Disjoint probe (the reported runs): the same draw as before probe facts were excluded.
    import random

    before = [cases[i] for i in random.Random(3).sample(range(10), 5)]
    assert choose_edits(cases, [{"case_id": 99}], 5, seed=3) == before
