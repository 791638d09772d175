"""The degradation analyses of benchmarks/ (degradation_bleed.py, degradation_controls.py): their arithmetic, and
both scripts end to end on a tiny lifelong run; and the factual C₀ text of degradation_ablation.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_lifelong import tiny_run_settings

from hf_encore.apps.lifelong import run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import degradation_ablation  # noqa: E402
import degradation_controls  # noqa: E402


def test_relative_disturbance_is_the_output_change_over_the_output_on_those_keys():
    generator = torch.Generator().manual_seed(0)
    base, delta = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    keys = torch.randn(50, 6, generator=generator) * torch.arange(1, 7)  # anisotropic: a wrong C would show
    moment = (keys.T @ keys / len(keys)).double()
    expected = (keys @ delta.T).pow(2).sum() / (keys @ base.T).pow(2).sum()
    assert abs(degradation_controls.relative_disturbance(delta, base, moment) - float(expected)) < 1e-6


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = degradation_controls.random_orthogonal(7, torch.Generator().manual_seed(1))
    assert torch.allclose(q @ q.T, torch.eye(7, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, degradation_controls.random_orthogonal(7, torch.Generator().manual_seed(1)))


def test_factual_corpus_mixes_statements_into_wikitext_and_leaves_out_probed_and_edited_facts(shared_data, tmp_path):
    from hf_encore.apps.lifelong import choose_edits
    from hf_encore.data import load_counterfact

    cases = load_counterfact(shared_data / "counterfact" / "counterfact-train.json")
    probe = cases[:20]
    args = argparse.Namespace(out=str(tmp_path), edits=30)
    path = degradation_ablation.factual_corpus(args, probe)
    statement = lambda case: f"{case['prompt'].replace('{}', case['subject'])} {case['target_true']}."  # noqa: E731
    text = path.read_text(encoding="utf-8")
    edited = choose_edits(cases, probe, 30, 0)
    left_out = {c["case_id"] for c in probe + edited}
    assert not [c["case_id"] for c in probe + edited if statement(c) in text]
    assert all(statement(c) in text for c in cases[:200] if c["case_id"] not in left_out)
    generic = {line.strip() for line in (shared_data / "corpus" / "wikitext-2-valid.txt").read_text().splitlines()}
    lines = text.splitlines()[:400]  # any prefix C₀ reads holds both kinds, about equally
    factual_chars = sum(len(line) for line in lines if line not in generic)
    assert 0.4 < factual_chars / sum(len(line) for line in lines) < 0.6
    assert degradation_ablation.factual_corpus(args, []).read_text(encoding="utf-8") == text  # built once per --out


def test_ablation_json_keeps_earlier_runs_of_the_same_protocol_and_refuses_another(tmp_path):
    path = tmp_path / "ablation.json"
    args = argparse.Namespace(model="m", dtype="float32", edits=300, batch_size=100, eval_every=100, json=str(path))
    read = degradation_ablation.read_earlier
    assert degradation_ablation.kept_runs(read(path), {}, args) == {}  # no file yet: nothing to keep
    path.write_text(json.dumps({"model": "m", "edits": 300, "batch_size": 100, "eval_every": 100,
                                "runs": {"defaults": {"old": 1}, "c0-rule": {"old": 2}}}))
    # a configuration collected now replaces its earlier figures; the others stay
    assert degradation_ablation.kept_runs(read(path), {"c0-rule": {"new": 3}}, args) == {"defaults": {"old": 1}}
    with pytest.raises(SystemExit, match="edits"):
        degradation_ablation.kept_runs(read(path), {}, argparse.Namespace(**{**vars(args), "edits": 100}))
    # a file from before runs recorded their dtype holds float32 runs: bf16 runs go to another file
    with pytest.raises(SystemExit, match="dtype"):
        degradation_ablation.kept_runs(read(path), {}, argparse.Namespace(**{**vars(args), "dtype": "bfloat16"}))
    path.write_text(json.dumps({"model": "m", "dtype": "bfloat16", "edits": 300, "batch_size": 100,
                                "eval_every": 100, "runs": {"defaults": {"old": 1}}}))
    bf16 = argparse.Namespace(**{**vars(args), "dtype": "bfloat16"})
    assert degradation_ablation.kept_runs(read(path), {}, bf16) == {"defaults": {"old": 1}}
    assert "--precision bfloat16" in " ".join(degradation_ablation.command("defaults", argparse.Namespace(
        **{**vars(bf16), "model": "smollm2-135m", "out": str(tmp_path), "perplexity_tokens": 10, "edited_sample": 1,
           "known_facts": 1})))


def test_ablation_json_keeps_every_command_that_wrote_it(tmp_path):
    path = tmp_path / "ablation.json"
    read = degradation_ablation.read_earlier
    assert degradation_ablation.kept_commands(read(path), "run a") == ["run a"]
    path.write_text(json.dumps({"command": "run a"}))  # a file from before the list: its one command is kept
    assert degradation_ablation.kept_commands(read(path), "run b") == ["run a", "run b"]
    path.write_text(json.dumps({"commands": ["run a", "run b"]}))
    assert degradation_ablation.kept_commands(read(path), "run a") == ["run b", "run a"]  # once, where it last ran


@pytest.mark.slow  # a lifelong run and two scripts in their own processes
def test_bleed_and_controls_read_a_finished_run(tiny_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path / "cache"))
    settings = tiny_run_settings(tiny_dir, shared_data, tmp_path, edits=4, batch_size=2, eval_every=4,
                                 downstream_tasks=(), perplexity_tokens=256, known_facts=8, edited_sample=2,
                                 fluency_sample=0)
    out = run(settings, progress=False)
    final_eval = [json.loads(line) for line in (out / "encore" / "log.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "eval"][-1]

    def script(name: str, *extra: str) -> dict:
        path = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--run", str(out), "--json", str(path),
                        *extra], check=True, capture_output=True)
        return json.loads(path.read_text())

    controls = script("degradation_controls", "--seeds", "2", "--text-tokens", "512")["runs"]["run"]
    assert controls["edits"] == 4 and controls["probe_facts"] == 8
    assert controls["retained"] == final_eval["retained_knowledge"]  # the same model as the run measured
    assert sum(q["facts"] for q in controls["retained_by_unedited_confidence_quartile"]) == 8
    for control in controls["controls"].values():
        assert len(control["retained"]) == 2 and all(0 <= r <= 1 for r in control["retained"])
    assert set(controls["relative_disturbance"]) == {"1", "2"}
    assert all(v["probe_prompts"] > 0 and v["wikitext"] > 0 for v in controls["relative_disturbance"].values())

    bleed = script("degradation_bleed")
    assert bleed["retained"] == final_eval["retained_knowledge"] and bleed["edits"] == 4
    assert sum(g["facts"] for g in bleed["retained_by_group"].values()) == 8
