"""Peak memory of one edit batch, or of one perplexity evaluation, per token budget of a forward pass. Prints
figures, writes JSON.

    python benchmarks/memory.py --model gemma-3-270m --method memit --requests 100 --max-tokens 4096 1024 \\
        --out docs/results/memory-gemma-3-270m.json
    python benchmarks/memory.py --part perplexity --model gemma-3-270m --max-tokens 4096 1024 \\
        --out docs/results/memory-perplexity-gemma-3-270m.json
    python benchmarks/memory.py --part evaluation --model gemma-3-270m \\
        --out docs/results/memory-evaluation-gemma-3-270m.json

Each budget is measured in a fresh Python process, since a process's peak resident set size (the figure that
decides whether a run fits in RAM on a CPU machine) cannot be reset; on CUDA the peak of allocated device memory
is reported too. The z-optimisation holds the most memory, and its first step the most of all (every request is
still active, and MEMIT has no early stop to thin the batch), so ``--z-steps 3`` keeps the measurement short
without lowering the peak. ``peak_rss_before_gb`` is the process after loading the model (and building the
adapter); the measured work's own share is the difference. ``--part perplexity`` measures the lifelong benchmark's
perplexity (held-out WikiText-2 test text, ``--perplexity-tokens`` tokens) on the unedited model instead, and
``--part evaluation`` one whole evaluation point of that benchmark with its default settings (the known-fact
probe chosen first; six downstream tasks, perplexity, retained knowledge, edit metrics of 500 counterfact-edit
cases) with the package's default token budgets: ``--max-tokens`` does not apply to it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from hf_encore import EncoreConfig, load_model
from hf_encore.apps.lifelong import EvalSettings, evaluate_point, perplexity_texts
from hf_encore.apps.options import parse_settings
from hf_encore.evaluation import known_facts, perplexity

from common import counterfact_cases, data_path, edit_requests, encore_model, machine, write_json, z_steps

FIRST_CASE = 2000  # counterfact-train cases from here on: the sweep's pool, never the reported edits


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def measured(device: str, work: Callable[[], Any]) -> tuple[Any, dict]:
    """``work()``'s value, and the process's peak memory before and after it and its time."""
    before = peak_rss_gb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = work()
    figures = {"peak_rss_before_gb": before, "peak_rss_gb": peak_rss_gb(), "seconds": time.perf_counter() - start}
    if device.startswith("cuda"):
        figures["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return value, figures


def measure_edit(model_name: str, method: str, n_requests: int, max_tokens: int, z_step_budget: int,
                 stats_tokens: int, device: str, overrides: dict) -> dict:
    """One edit batch in this process; its figures."""
    torch.manual_seed(0)
    requests = edit_requests(counterfact_cases(first=FIRST_CASE, count=n_requests))
    config = EncoreConfig(method=method, v_num_grad_steps=z_step_budget, stats_n_tokens=stats_tokens,
                          max_tokens_per_forward=max_tokens, **overrides)
    model = encore_model(model_name, config, device=device)[0]
    report, figures = measured(device, lambda: model.edit(requests, progress=False))
    return {"max_tokens_per_forward": max_tokens, **figures, "z_steps": z_steps(report)}


def measure_perplexity(model_name: str, max_tokens: int, n_tokens: int, device: str) -> dict:
    """One perplexity evaluation, as the lifelong benchmark runs it, in this process; its figures."""
    base, tokenizer = load_model(model_name, device=device)
    texts = perplexity_texts(data_path("corpus", "wikitext-2-test.txt"))
    value, figures = measured(device, lambda: perplexity(base, tokenizer, texts, n_tokens=n_tokens,
                                                         max_tokens=max_tokens))
    return {"max_tokens_per_forward": max_tokens, **figures, "perplexity": value, "tokens": n_tokens}


def measure_evaluation(model_name: str, device: str) -> dict:
    """One evaluation point of the lifelong benchmark (default settings, unedited model) in this process."""
    base, tokenizer = load_model(model_name, device=device)
    texts = perplexity_texts(data_path("corpus", "wikitext-2-test.txt"))
    ev = EvalSettings()
    edited = counterfact_cases("edit")[: ev.edited_sample]
    candidates = counterfact_cases("train")

    def evaluation() -> dict:
        probe = known_facts(base, tokenizer, candidates, ev.known_facts)
        return evaluate_point(base, tokenizer, edited=edited, probe=probe, texts=texts,
                              downstream_dir=data_path("downstream"), ev=ev, adapter=False)

    record, figures = measured(device, evaluation)
    return {**figures, "perplexity": record["perplexity"], "part_seconds": record["eval_part_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["edit", "perplexity", "evaluation"], default="edit")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="memit")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--max-tokens", type=int, nargs="+", default=[4096], help="token budgets to measure")
    p.add_argument("--z-steps", type=int, default=3)
    p.add_argument("--stats-tokens", type=int, default=2048, help="statistics text (only its time, not the peak)")
    p.add_argument("--perplexity-tokens", type=int, default=20_000, help="held-out tokens (--part perplexity)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other EncoreConfig settings")
    p.add_argument("--out", type=Path, default=Path("memory.json"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one budget, measured in this process
    args = p.parse_args()
    overrides = parse_settings(args.set)
    if args.child is not None:
        if args.part == "edit":
            result = measure_edit(args.model, args.method, args.requests, args.child, args.z_steps,
                                  args.stats_tokens, args.device, overrides)
        elif args.part == "perplexity":
            result = measure_perplexity(args.model, args.child, args.perplexity_tokens, args.device)
        else:
            result = measure_evaluation(args.model, args.device)
        print(json.dumps(result))
        return

    runs = []
    for budget in args.max_tokens if args.part != "evaluation" else [4096]:  # the package's default budget
        command = [sys.executable, __file__, *sys.argv[1:], "--child", str(budget)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the measurement at max_tokens_per_forward={budget} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        what = f"{r['z_steps']} z-steps" if args.part == "edit" else f"perplexity {r['perplexity']:.4f}"
        print(f"max_tokens_per_forward {budget}: peak RSS {r['peak_rss_gb']:.2f} GB "
              f"({r['peak_rss_before_gb']:.2f} before), {what}, {r['seconds']:.1f} s"
              + (f", CUDA peak {r['cuda_peak_allocated_gb']:.2f} GB" if "cuda_peak_allocated_gb" in r else ""),
              flush=True)
    results = {"command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]), "machine": machine(args.device),
               "model": args.model, "part": args.part, "runs": runs,
               **{"edit": {"method": args.method, "requests": args.requests, "z_step_budget": args.z_steps},
                  "perplexity": {"perplexity_tokens": args.perplexity_tokens},
                  "evaluation": {"evaluation": asdict(EvalSettings())}}[args.part]}
    write_json(args.out, results, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
