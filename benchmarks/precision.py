"""Editing a half-precision base, and holding C₀ / S_prev in float32: scores, z-steps, time and memory.

    python benchmarks/precision.py --models smollm2-135m qwen2.5-0.5b --dtypes float32 bfloat16 float16 \\
        --edits 100 --batch-size 10 --out "docs/results/precision-{model}.json"
    python benchmarks/precision.py --part moments --models smollm2-135m --moments-dtypes float64 float32 \\
        --edits 100 --batch-size 10 --out "docs/results/moments-dtype-{model}.json"

``--part precision`` (default): for each model and base dtype (``load_model(name, dtype=...)``), ENCORE with its
defaults edits the first ``--edits`` counterfact-train cases in sequential batches of ``--batch-size``, and the
record holds ES/PS/NS (and S, EM/PM/NM) of the edited facts before and after, the z-optimisation steps, the time
per edit (C₀ measured or read from the cache beforehand and timed apart), the largest ‖W‖/‖W₀‖ and the process's
peak resident memory. ``--part moments``: one fp32 base, ENCORE with ``moments_dtype`` set to each of
``--moments-dtypes``; besides the same figures, the relative Frobenius difference of the final deltas of each
edited layer against the first dtype's (‖Δ_a − Δ_b‖ / ‖Δ_a‖). Its float64 run is the precision part's fp32 run
when that held C₀ / S_prev in float64 too (``moments_dtype=None`` up to d_k = 8192) on the same edits: reused, not
run again. The precision part also records the bf16/fp16 deltas' difference from the fp32 base's.

Every configuration runs in a subprocess of its own, so that its peak RSS (``VmHWM``) is its own; the high-water
mark is also reset after loading and C₀ (``/proc/self/clear_refs``) to give the peak of editing and scoring alone.
``--max-edit-seconds S`` stops a configuration after the batch in which its edit time passed S, and scores the
facts edited so far (the record says how many). ``--threads`` sets torch's CPU threads in each configuration
(1 is faster than 2 on a 2-core machine that other processes share). ``--out`` may hold ``{model}``. A rerun
skips configurations already in the output file (resumable); ``--redo`` runs them again. ``--set KEY=VALUE``
fixes an ``EncoreConfig`` setting in every configuration (recorded in its ``settings``; e.g. a smaller C₀ budget or
other layers for a large model on a CPU); a rerun with other ``--set`` values adds configurations beside the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PARTS = ("precision", "moments")
DELTAS_DIR = Path(tempfile.gettempdir()) / "hf_encore_precision_deltas"


# ---------------------------------------------------------------- the worker: one configuration in this process


def rss_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def scores_of(model, tokenizer, cases) -> dict[str, Any]:
    """ES/PS/NS, S and EM/PM/NM of ``cases``, and the per-case successes (``per_case``)."""
    from hf_encore.evaluation import counterfact_scores

    return counterfact_scores(model, tokenizer, cases)


def summary(scores: dict[str, Any], count: int | None = None) -> dict[str, float]:
    """The figures of :func:`scores_of`; with ``count``, ES/PS/NS and S of the first ``count`` cases only."""
    from hf_encore.evaluation import harmonic_mean

    if count is None:
        return {k: scores[k] for k in ("ES", "PS", "NS", "S", "EM", "PM", "NM")}
    part = {k: sum(scores["per_case"][k][:count]) / count for k in ("ES", "PS", "NS")}
    return {**part, "S": harmonic_mean(list(part.values()))}


def run_configuration(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, measure C₀, edit in batches, score; ``spec``: model, dtype, settings, edits, batch_size, threads,
    max_edit_seconds, deltas (a path to save the final deltas at, or None)."""
    from hf_encore import EncoreConfig, get_encore_model, load_model
    from hf_encore.evaluation import weight_norms
    from hf_encore.layer import Linear

    from common import corpus_path, counterfact_cases, edit_requests, mpes_stops, z_steps

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cases = counterfact_cases(count=spec["edits"])
    start = time.perf_counter()
    device = spec.get("device") or "cpu"
    base, tokenizer = load_model(spec["model"], dtype=getattr(torch, spec["dtype"]), device=device)
    config = EncoreConfig(method="encore", **spec["settings"])
    model = get_encore_model(base, config, tokenizer=tokenizer, corpus=corpus_path())
    load_seconds = time.perf_counter() - start
    rss_loaded = rss_mb("VmRSS")
    before = scores_of(model, tokenizer, cases)  # no edits yet: the unedited base in this dtype

    start = time.perf_counter()
    stats = model.base_model.compute_statistics(progress=False)
    stats_seconds = time.perf_counter() - start
    d_k = next(iter(stats.values())).c0.shape[0]
    moments_dtype = str(next(iter(stats.values())).c0.dtype).removeprefix("torch.")
    peak_load = rss_mb("VmHWM")
    reset_ok = reset_peak()

    batches: list[dict[str, Any]] = []
    edited = 0
    edit_seconds = 0.0
    for first in range(0, len(cases), spec["batch_size"]):
        report = model.edit(edit_requests(cases[first: first + spec["batch_size"]]), progress=False)
        edited += len(report.requests)
        edit_seconds += report.seconds["total"]
        batches.append({"edits": len(report.requests), "seconds": report.seconds["total"],
                        "profile_seconds": report.seconds,
                        "z_steps": z_steps(report), "mpes_stopped": mpes_stops(report)})
        print(f"  batch {len(batches)}: {len(report.requests)} edits, {report.seconds['total']:.1f} s, "
              f"{z_steps(report)} z-steps", flush=True)
        if spec["max_edit_seconds"] and edit_seconds > spec["max_edit_seconds"] and edited < len(cases):
            print(f"  stopped after {edited} edits: {edit_seconds:.0f} s > --max-edit-seconds", flush=True)
            break
    after = summary(scores_of(model, tokenizer, cases[:edited]))
    peak_edit = rss_mb("VmHWM")
    config_used = model.peft_config["default"]
    if spec["deltas"]:
        deltas = {n: m.encore_delta["default"].detach().float().cpu().clone()
                  for n, m in model.named_modules() if isinstance(m, Linear)}
        Path(spec["deltas"]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(deltas, spec["deltas"])
    delta_dtypes = sorted({str(m.encore_delta["default"].dtype).removeprefix("torch.")
                           for m in model.modules() if isinstance(m, Linear)})
    return {
        "model": spec["model"], "dtype": spec["dtype"], "settings": spec["settings"],
        "moments_dtype_held": moments_dtype,
        "d_k": d_k, "layers": list(config_used.layers), "delta_dtypes": delta_dtypes,
        "edits_asked": len(cases), "edits": edited, "batch_size": spec["batch_size"], "batches": len(batches),
        "scores_unedited": summary(before, None if edited == len(cases) else edited),
        "scores": after,
        "z_steps": sum(b["z_steps"] for b in batches), "z_steps_per_edit": sum(b["z_steps"] for b in batches) / edited,
        "mpes_stopped": sum(b["mpes_stopped"] for b in batches),
        "seconds_per_edit": edit_seconds / edited, "edit_seconds": edit_seconds, "per_batch": batches,
        "load_seconds": load_seconds, "statistics_seconds": stats_seconds,
        "max_norm_ratio": max(v["norm_ratio"] for v in weight_norms(model).values()),
        "rss_after_load_mb": rss_loaded, "peak_rss_load_and_statistics_mb": peak_load,
        "peak_rss_editing_and_scoring_mb": peak_edit if reset_ok else None,
        "peak_rss_mb": max(peak_load, peak_edit),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "peak_cuda_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    }


# ---------------------------------------------------------------- the driver: configurations in subprocesses


def run_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_configuration` in a fresh interpreter; on failure, a record with the error and its traceback."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--result", result_path]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    try:
        if proc.returncode == 0:
            result = json.loads(Path(result_path).read_text())
            result["wall_seconds"] = wall
            return result
        sys.stderr.write(proc.stderr)
        tail = proc.stderr[proc.stderr.rfind("Traceback (most recent call last)"):] if "Traceback" in proc.stderr \
            else proc.stderr[-4000:]
        return {"model": spec["model"], "dtype": spec["dtype"], "settings": spec["settings"], "error": tail.strip(),
                "returncode": proc.returncode, "wall_seconds": wall}
    finally:
        os.unlink(result_path)


def same_config(record: dict[str, Any], spec: dict[str, Any]) -> bool:
    return (record["model"] == spec["model"] and record["dtype"] == spec["dtype"]
            and record["settings"] == spec["settings"] and record.get("edits_asked", spec["edits"]) == spec["edits"]
            and record.get("batch_size", spec["batch_size"]) == spec["batch_size"]
            and record.get("device", "cpu") == spec.get("device", "cpu"))


def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖a − b‖_F / ‖a‖_F per delta."""
    return {k: float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-300)) for k in a}


def table(rows: list[dict[str, Any]], part: str) -> str:
    label = "moments" if part == "moments" else "base dtype"
    lines = [f"| model | {label} | edits | ES | PS | NS | ES/PS/NS unedited | z-steps | s/edit | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["settings"].get("moments_dtype", "default") if part == "moments" else r["dtype"]
        if "error" in r:
            lines.append(f"| {r['model']} | {name} | error: {r['error'].splitlines()[-1][:80]} |||||||")
            continue
        s, u = r["scores"], r["scores_unedited"]
        lines.append(f"| {r['model']} | {name} | {r['edits']} | {s['ES']:.2f} | {s['PS']:.2f} | {s['NS']:.2f} "
                     f"| {u['ES']:.2f}/{u['PS']:.2f}/{u['NS']:.2f} | {r['z_steps']} | {r['seconds_per_edit']:.2f} "
                     f"| {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS, default="precision")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                        choices=["float32", "bfloat16", "float16"], help="base dtypes (--part precision)")
    parser.add_argument("--moments-dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"],
                        help="moments_dtype settings, the first the reference (--part moments; fp32 base)")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (peak GPU memory is recorded)")
    parser.add_argument("--max-edit-seconds", type=float, default=None,
                        help="stop a configuration after the batch in which its edit time passed this")
    parser.add_argument("--redo", action="store_true", help="rerun configurations already in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an EncoreConfig setting fixed in every configuration, e.g. stats_n_tokens=89600")
    parser.add_argument("--out", default=None, help="JSON file; may hold {model} (default: docs/results/"
                                                    "precision-{model}.json or moments-dtype-{model}.json)")
    parser.add_argument("--out-precision", default="docs/results/precision-{model}.json",
                        help="--part moments reuses the float32 run of this file when it is the same computation")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_configuration(json.loads(args.worker))
        Path(args.result).write_text(json.dumps(result, default=float))
        return

    from hf_encore.apps.options import UsageError, parse_settings

    from common import machine, write_json

    try:
        fixed = parse_settings(args.set)
    except UsageError as error:
        parser.error(str(error))
    if args.part == "moments" and "moments_dtype" in fixed:
        parser.error("--set moments_dtype: --part moments varies it (--moments-dtypes)")
    torch.set_num_threads(args.threads)
    stem = "precision" if args.part == "precision" else "moments-dtype"
    out_pattern = args.out or f"docs/results/{stem}-{{model}}.json"
    command = " ".join(["python", "benchmarks/precision.py", *sys.argv[1:]])
    for model in args.models:
        out = Path(out_pattern.format(model=model))
        results = json.loads(out.read_text()) if out.is_file() else {}
        runs: list[dict[str, Any]] = results.get("runs", [])
        if args.part == "precision":
            variants = [(dtype, dict(fixed)) for dtype in args.dtypes]
        else:
            variants = [("float32", {**fixed, "moments_dtype": m}) for m in args.moments_dtypes]
        for dtype, settings in variants:
            tag = "-".join(f"{k}={v}" for k, v in sorted(settings.items()) if k != "moments_dtype")
            deltas = str(DELTAS_DIR / f"{model}-{dtype}-{settings.get('moments_dtype')}-{args.edits}x"
                                      f"{args.batch_size}{'-' + tag.replace(' ', '') if tag else ''}.pt")
            spec = {"model": model, "dtype": dtype, "settings": settings, "edits": args.edits,
                    "batch_size": args.batch_size, "threads": args.threads, "device": args.device,
                    "max_edit_seconds": args.max_edit_seconds, "deltas": deltas}
            done = [r for r in runs if same_config(r, spec)]
            if done and not args.redo and "error" not in done[0]:
                print(f"{model} {dtype} {settings or ''}: already in {out}, skipped", flush=True)
                continue
            reused = reusable_run(spec, args) if args.part == "moments" and not args.redo else None
            if reused:
                print(f"{model} {dtype} {settings}: the same configuration as {reused['reused_from']}'s float32 "
                      "run (moments held in float64 there too), reused", flush=True)
                runs = [r for r in runs if not same_config(r, spec)] + [reused]
                continue
            runs = [r for r in runs if not same_config(r, spec)]
            print(f"{model} {dtype} {settings or ''}: running", flush=True)
            version = code_version()  # as the configuration starts: it imports hf_encore then
            record = run_in_subprocess(spec)
            record.update({"command": command, "machine": machine(), "code": version,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "max_edit_seconds": args.max_edit_seconds})
            if deltas and "error" not in record:
                record["deltas_file"] = deltas
            runs.append(record)
            print(table([record], args.part).splitlines()[-1], flush=True)
            runs = merged(out, runs)
            results.update({"part": args.part, "model": model, "method": "encore (defaults)",
                            "data": "counterfact-train.json, the first edits_asked cases (each run's)",
                            "corpus": "corpus/wikitext-2-valid.txt", "runs": runs})
            results["delta_relative_difference"] = comparison(runs, args, fixed)
            write_json(out, results)
        if "runs" in results:
            runs = results["runs"] = merged(out, runs)
            results["delta_relative_difference"] = comparison(runs, args, fixed)
            write_json(out, results)
        print(f"\n{out}:")
        print(table(runs, args.part))
        if args.part == "moments" and results.get("delta_relative_difference"):
            for name, diffs in results["delta_relative_difference"].items():
                print(f"{name}: " + ", ".join(f"{k}: {v:.2e}" for k, v in diffs["per_layer"].items()))


def code_version() -> str:
    """The git commit the configuration ran on, with "+changes" when hf_encore/ differed from it."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", "hf_encore") else "")


def merged(out: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` and the runs another process wrote to ``out`` meanwhile (configurations not in ``runs``)."""
    if not out.is_file():
        return runs
    others = [r for r in json.loads(out.read_text()).get("runs", [])
              if not any(same_config(r, {**mine, "edits": mine.get("edits_asked"),
                                         "batch_size": mine.get("batch_size")}) for mine in runs)]
    return runs + others


def reusable_run(spec: dict[str, Any], args) -> dict[str, Any] | None:
    """For ``--part moments``: the precision part's run of the same model, fp32 base, edits and batches, when its
    moments were held in the dtype ``spec`` asks for (``moments_dtype`` None resolves to float64 up to d_k = 8192)
    and its deltas were kept: the same computation, so it is not run twice."""
    path = Path(args.out_precision.format(model=spec["model"]))
    if not path.is_file():
        return None
    for r in json.loads(path.read_text()).get("runs", []):
        if (r["dtype"] == spec["dtype"] and "error" not in r and r["edits_asked"] == spec["edits"]
                and r["batch_size"] == spec["batch_size"] and r["edits"] == r["edits_asked"]
                and r["moments_dtype_held"] == spec["settings"]["moments_dtype"]
                and r.get("deltas_file") and Path(r["deltas_file"]).is_file()
                and r["settings"] == without_moments_dtype(spec["settings"])):
            return {**r, "settings": spec["settings"], "reused_from": str(path),
                    "reused_settings": r["settings"]}
    return None


def without_moments_dtype(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "moments_dtype"}


def comparison(runs: list[dict[str, Any]], args, fixed: dict[str, Any]) -> dict[str, Any]:
    """Relative Frobenius difference of each run's final deltas (per layer) against the reference run's: the first
    --moments-dtypes (``--part moments``) or the float32 base (``--part precision``; only runs of the same edits),
    among the runs made with this invocation's ``--set`` settings."""
    kept = [r for r in runs if "error" not in r and r.get("deltas_file") and Path(r["deltas_file"]).is_file()
            and without_moments_dtype(r.get("reused_settings", r["settings"])) == fixed]
    if args.part == "moments":
        name_of = lambda r: r["settings"].get("moments_dtype")  # noqa: E731
        reference = args.moments_dtypes[0]
    else:
        name_of = lambda r: r["dtype"]  # noqa: E731
        reference = "float32"
    by_name = {name_of(r): r for r in kept}
    if reference not in by_name:
        return {}
    a = torch.load(by_name[reference]["deltas_file"])
    result = {}
    for name, r in by_name.items():
        if name == reference or r["edits"] != by_name[reference]["edits"]:
            continue
        diffs = relative_differences(a, torch.load(r["deltas_file"]))
        result[f"{name} vs {reference}"] = {"per_layer": diffs, "max": max(diffs.values()),
                                            "formula": "||delta_ref - delta||_F / ||delta_ref||_F"}
    return result


if __name__ == "__main__":
    main()
