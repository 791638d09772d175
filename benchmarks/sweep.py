"""A small one-at-a-time settings sweep on held-out facts (counterfact-train, never the reported edits).

    python benchmarks/sweep.py --model smollm2-135m --method encore --requests 100 --batch-size 50 \\
        --vary v_lr 0.05 0.1 0.2 --vary norm_weight 0.01 0.2 --vary layers "[2,3,4,5,6]" "[6,7,8,9,10]" \\
        --out docs/results/sweep/smollm2-encore.jsonl

Every configuration starts from the same fresh model and edits the same facts in sequential batches; it records
efficacy / generalisation / specificity (ES, PS, NS, S) of all edited facts, the retained knowledge of facts the
unedited model knew (never edited), the largest ‖W‖/‖W₀‖, z-optimisation steps and MPES stops per edit, and time.
The first configuration is the defaults (plus ``--set``); each ``--vary KEY V…`` adds one configuration per value,
the others at their defaults. Results go to JSON lines, one per configuration; a rerun skips those already there
(resumable), and the table is printed from the file. ``--dtype bfloat16`` loads the base in bf16 (about twice as fast
on a CPU with native bf16, and the way a larger model fits a sweep on one); each row records its dtype.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch

from hf_encore import EncoreConfig, load_model
from hf_encore.apps.options import parse_settings, parse_value
from hf_encore.evaluation import counterfact_scores, known_facts, retained_knowledge, weight_norms
from hf_encore.jsonl import append_jsonl, read_jsonl

from common import counterfact_cases, edit_requests, encore_model, mpes_stops, z_steps

PROBE_POOL = 2000  # retained-knowledge facts come from the first cases of the file, edits from the rest


def configurations(fixed: dict[str, Any], vary: list[list[str]]) -> list[dict[str, Any]]:
    """The defaults (with ``fixed``), then one configuration per varied value."""
    configs = [dict(fixed)]
    for key, *values in vary:
        configs += [{**fixed, key: parse_value(v)} for v in values]
    unique: list[dict[str, Any]] = []
    for c in configs:
        if c not in unique:
            unique.append(c)
    return unique


def run_one(model_name: str, method: str, settings: dict[str, Any], facts: list[dict], probe: list[dict],
            batch_size: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    model, tokenizer = encore_model(model_name, EncoreConfig(method=method, **settings), dtype=dtype)
    steps = stops = 0
    seconds = 0.0
    for start in range(0, len(facts), batch_size):
        report = model.edit(edit_requests(facts[start: start + batch_size]), progress=False)
        steps += z_steps(report)
        stops += mpes_stops(report)
        seconds += report.seconds["total"]
    scores = counterfact_scores(model, tokenizer, facts)
    return {
        "settings": settings, "method": method, "edits": len(facts), "batch_size": batch_size,
        **{k: scores[k] for k in ("ES", "PS", "NS", "S")},
        "retained_knowledge": retained_knowledge(model, tokenizer, probe) if probe else None,
        "max_norm_ratio": max(v["norm_ratio"] for v in weight_norms(model).values()),
        "z_steps_per_edit": steps / len(facts), "mpes_stopped": stops / len(facts),
        "seconds_per_edit": seconds / len(facts),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| settings | ES | PS | NS | S | retained | max ‖W‖/‖W₀‖ | z-steps/edit | MPES stops | s/edit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, k, f: f.format(r[k]) if r.get(k) is not None else "–"  # noqa: E731
    for r in rows:
        name = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        label = "unedited" if r["method"] is None else f"{r['method']}: {name}"
        lines.append(f"| {label} | {r['ES']:.3f} | {r['PS']:.3f} | {r['NS']:.3f} | {r['S']:.3f} "
                     f"| {fmt(r, 'retained_knowledge', '{:.3f}')} | {fmt(r, 'max_norm_ratio', '{:.4f}')} "
                     f"| {fmt(r, 'z_steps_per_edit', '{:.1f}')} | {fmt(r, 'mpes_stopped', '{:.2f}')} "
                     f"| {fmt(r, 'seconds_per_edit', '{:.2f}')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="encore")
    parser.add_argument("--data", default=None, help="CounterFact file (default: counterfact-train.json)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--known-facts", type=int, default=100, help="probe facts for retained knowledge (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the base's dtype (rows of another dtype in --out are kept apart)")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed for every run")
    parser.add_argument("--vary", action="append", nargs="+", default=[], metavar="KEY V", help="KEY V1 V2 …")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if any(len(v) < 2 for v in args.vary):
        parser.error("--vary takes a setting and at least one value")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fixed = parse_settings(args.set)
    configs = configurations(fixed, args.vary)
    for c in configs:
        EncoreConfig(method=args.method, **c)  # a bad setting fails before anything runs

    cases = counterfact_cases(path=args.data)
    if len(cases) < PROBE_POOL + args.requests:
        parser.error(f"the data file has {len(cases)} cases; needs {PROBE_POOL} + {args.requests}")
    facts = random.Random(args.seed).sample(cases[PROBE_POOL:], args.requests)
    base, tokenizer = load_model(args.model, dtype=dtype)
    probe = known_facts(base, tokenizer, cases[:PROBE_POOL], args.known_facts)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # rows of another model, request count or dtype (float32 where a row has none) are not this sweep's
    done = [r for r in (read_jsonl(out) if out.is_file() else [])
            if r["model"] == args.model and r["requests"] == args.requests
            and r.get("dtype", "float32") == args.dtype]
    header = {"model": args.model, "dtype": args.dtype, "requests": args.requests, "batch_size": args.batch_size,
              "seed": args.seed, "threads": torch.get_num_threads(), "known_facts": len(probe)}
    if not any(r["method"] is None for r in done):
        scores = counterfact_scores(base, tokenizer, facts)  # where the edited facts start from
        record = {**header, "settings": {}, "method": None, **{k: scores[k] for k in ("ES", "PS", "NS", "S")}}
        append_jsonl(out, record)
        done.insert(0, record)
    del base
    for settings in configs:
        if any(r["settings"] == settings and r["method"] == args.method for r in done):
            continue
        start = time.perf_counter()
        record = {**header, **run_one(args.model, args.method, settings, facts, probe, args.batch_size, dtype),
                  "wall_seconds": time.perf_counter() - start}
        append_jsonl(out, record)
        done.append(record)
        print(table([record]).splitlines()[-1], flush=True)
    mine = sorted(done, key=lambda r: r["method"] is not None)  # the unedited row first
    print(table(mine))


if __name__ == "__main__":
    main()
