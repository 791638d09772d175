"""Side-by-side speed benchmark: the optimised editing path against the straightforward reference path
(``hf_encore.editing.reference``) on the same requests, ENCORE against MEMIT and AlphaEdit, statistics throughput,
and the z-optimisation's share of this machine's measured matmul peak. Prints figures and writes JSON.

    python benchmarks/speed.py --model smollm2-135m --edits 100 --out docs/results/speed-smollm2-135m.json
    python benchmarks/speed.py --model gemma-3-270m --edits 100 --out docs/results/speed-gemma-3-270m.json

``--reference-edits K`` runs the reference path on the first K requests only (it handles one request at a time, so
its time per edit does not depend on the batch; the optimised path is then also run on those K for the agreement
check). Statistics are compared on ``--stats-tokens`` tokens. ``--parts methods`` (or ``statistics``,
``reference``) reruns some sections and keeps the others of an existing JSON file; each section records the
command, time and matmul peak of its run. ``--batch-sizes 1 20`` adds the ``batch_sizes`` section: each method's
time per edit at each of those batch sizes (``--parts batch_sizes`` reruns only it, by default at 1 and 20).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_encore import EncoreConfig, get_encore_model, load_model
from hf_encore.apps.options import parse_settings
from hf_encore.editing.corpus import packed_chunks, read_corpus
from hf_encore.editing.pipeline import FAST_STEPS
from hf_encore.editing.reference import REFERENCE_STEPS, reference_second_moments
from hf_encore.editing.requests import parse_requests, prepare_requests
from hf_encore.editing.stats import second_moments
from hf_encore.editing.tracing import ModelAccess
from hf_encore.evaluation import counterfact_scores
from hf_encore.layer import Linear

from common import (
    corpus_path,
    counterfact_cases,
    edit_requests,
    encore_model,
    machine,
    model_directory,
    mpes_stops,
    write_json,
    z_steps,
)


@dataclass(frozen=True)
class Bench:
    """What every section of one benchmark run shares: the model, where it runs and the EncoreConfig settings
    (``--set``) of every edit. The statistics text is :func:`common.corpus_path`'s."""

    model_dir: Path
    device: str | None = None
    settings: dict = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and torch.device(self.device).type == "cuda"

    def synchronize(self) -> None:
        """Wait for queued GPU work, so that wall-clock readings cover it."""
        if self.on_gpu:
            torch.cuda.synchronize()

    def load(self):
        return load_model(str(self.model_dir), device=self.device)

    def config(self, **overrides) -> EncoreConfig:
        return EncoreConfig(**{**self.settings, **overrides})

    def matmul_peak_gflops(self) -> float:
        """Measured fp32 matmul throughput on the run's device (TF32 stays off, as in editing)."""
        n, repeats = (8192, 20) if self.on_gpu else (2048, 10)
        a, b = torch.randn(n, n, device=self.device), torch.randn(n, n, device=self.device)
        a @ b
        self.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        self.synchronize()
        return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def deltas(model) -> dict[str, torch.Tensor]:
    return {n: m.encore_delta["default"].detach().clone() for n, m in model.named_modules() if isinstance(m, Linear)}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


def z_flops(model, report, config, requests, tokenizer) -> float:
    """FLOPs the z-optimisation must do. Once: a forward pass of every sequence through all blocks (block L's
    outputs, and the keys/values before the subject's last token). Per request and evaluated step: a forward pass
    of its sequences from the subject's last token on through the blocks above L, plus logits at its target and KL
    positions; per optimiser step, the same again backwards (input gradients only: the weights are frozen).
    Attention-score FLOPs (∝ T², T ≈ 20) are left out."""
    state = model.base_model.edit_states["default"]
    prepared = prepare_requests(tokenizer, parse_requests(requests), state.context_templates)
    blocks = ModelAccess(model.base_model.model, model.base_model._layout(config)).blocks
    critical = config.layers[-1]
    params_above = sum(p.numel() for b in blocks[critical + 1:] for p in b.parameters())
    params_all = sum(p.numel() for b in blocks for p in b.parameters())
    vocab, width = model.base_model.model.get_output_embeddings().weight.shape
    total = 0.0
    for req, rep in zip(prepared, report.requests):
        lengths = [(len(p.ids) + len(req.target_ids) - 1, p.subject_last) for p in req.prompts]
        lengths.append((len(req.kl_prompt.ids), req.kl_prompt.subject_last))
        all_tokens = sum(n for n, _ in lengths)
        suffix_tokens = sum(n - split for n, split in lengths)
        positions = len(req.prompts) * len(req.target_ids) + 1
        per_pass = 2 * suffix_tokens * params_above + 2 * positions * width * vocab
        total += 2 * all_tokens * params_all + (rep.steps + 1) * per_pass + rep.steps * per_pass
    return total


def timed_edit(bench: Bench, method, requests, reference=False):
    model, tok = encore_model(bench.model_dir, bench.config(method=method), device=bench.device)
    model.base_model.compute_statistics(progress=False)  # cached before timing: statistics are measured apart
    report = model.edit(requests, progress=False, steps=REFERENCE_STEPS if reference else FAST_STEPS)
    return model, tok, report


def statistics_part(bench: Bench, stats_tokens: int) -> dict:
    """One early-stopping pass for all layers against one full pass per layer, on the same chunks."""
    base, tok = bench.load()
    config = bench.config()
    model = get_encore_model(base, config, tokenizer=tok)
    access = ModelAccess(model.base_model.model, model.base_model._layout(config))
    chunks = packed_chunks(tok, read_corpus(corpus_path()).texts, stats_tokens, config.stats_seq_len)
    stats = {}
    for name, function in (("optimised", second_moments), ("reference", reference_second_moments)):
        bench.synchronize()
        start = time.perf_counter()
        moments, count = function(access, chunks, config.layers, tok.pad_token_id, config.max_tokens_per_forward,
                                  False)
        bench.synchronize()
        seconds = time.perf_counter() - start
        stats[name] = {"seconds": seconds, "tokens": count, "layers": len(config.layers),
                       "tokens_per_second": count / seconds, "moments": moments}
        print(f"statistics {name}: {count} tokens x {len(config.layers)} layers in {seconds:.1f} s "
              f"({count / seconds:.0f} tok/s)", flush=True)
    agreement = max(float((stats["optimised"]["moments"][layer] - stats["reference"]["moments"][layer]).abs().max()
                          / stats["reference"]["moments"][layer].abs().max()) for layer in config.layers)
    result = {name: {k: v for k, v in s.items() if k != "moments"} for name, s in stats.items()}
    result["speedup"] = stats["reference"]["seconds"] / stats["optimised"]["seconds"]
    result["max_relative_difference"] = agreement
    print(f"statistics speed-up {result['speedup']:.1f}x (max rel. difference {agreement:.1e})")
    return result


def reference_part(bench: Bench, cases, requests) -> dict:
    """ENCORE by the optimised and the reference path on the same requests: time, scores, deltas."""
    runs = {}
    for path in ("optimised", "reference"):
        model, tok, report = timed_edit(bench, "encore", requests, reference=path == "reference")
        scores = counterfact_scores(model, tok, cases)
        runs[path] = {"report": report, "deltas": deltas(model), "scores": scores}
        print(f"encore {path:>9}: {report.seconds['total'] / len(requests):.2f} s/edit over {len(requests)} edits "
              f"(ES {scores['ES']:.2f}, PS {scores['PS']:.2f}, NS {scores['NS']:.2f}; "
              f"profile {', '.join(f'{k} {v:.1f}' for k, v in report.seconds.items())})", flush=True)
    result = {
        path: {"seconds_per_edit": r["report"].seconds["total"] / len(requests), "profile_seconds": r["report"].seconds,
               "z_steps": z_steps(r["report"]),
               "scores": {k: v for k, v in r["scores"].items() if k != "per_case"}}
        for path, r in runs.items()}
    result["speedup"] = result["reference"]["seconds_per_edit"] / result["optimised"]["seconds_per_edit"]
    result["delta_relative_difference"] = relative_difference(runs["reference"]["deltas"], runs["optimised"]["deltas"])
    print(f"optimised vs reference: {result['speedup']:.2f}x faster; deltas differ by "
          f"{result['delta_relative_difference']:.1e} (relative)", flush=True)
    return result


def methods_part(bench: Bench, requests, methods, peak: float, rounds: int = 1) -> tuple[dict, float | None]:
    """Each method on the full batch, each from a freshly loaded model, after one untimed warm-up edit; and ENCORE's
    time per edit over MEMIT's. With ``rounds`` > 1 the methods run in alternating order (A B C, C B A, …) and each
    figure is the mean of its runs, so a drift in the machine's speed cancels out of the ratios."""
    timed_edit(bench, methods[0], requests[:2])
    result: dict = {}
    for round_ in range(rounds):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            model, tok, report = timed_edit(bench, method, requests)
            seconds = report.seconds["total"] / len(requests)
            print(f"{method:>10}: {seconds:.2f} s/edit at batch {len(requests)}, "
                  f"{z_steps(report)} z-steps; profile "
                  f"{', '.join(f'{k} {v:.1f}' for k, v in report.seconds.items())}", flush=True)
            if method in result:
                result[method]["runs_seconds_per_edit"].append(seconds)
                continue
            entry = {"runs_seconds_per_edit": [seconds], "profile_seconds": report.seconds,
                     "z_steps": z_steps(report), "mpes_stopped": mpes_stops(report)}
            if method == "encore":
                flops = z_flops(model, report, model.peft_config["default"], requests, tok)
                entry["z_gflops"] = flops / 1e9
                entry["z_gflops_per_second"] = flops / 1e9 / report.seconds["targets"]
                entry["z_utilisation_of_matmul_peak"] = entry["z_gflops_per_second"] / peak
            result[method] = entry
    for entry in result.values():
        entry["seconds_per_edit"] = sum(entry["runs_seconds_per_edit"]) / len(entry["runs_seconds_per_edit"])
    ratio = None
    if "encore" in result and "memit" in result:
        ratio = result["encore"]["seconds_per_edit"] / result["memit"]["seconds_per_edit"]
        print(f"ENCORE / MEMIT time per edit: {ratio:.2f} (mean of {rounds} run(s) each)")
    if "encore" in result:
        e = result["encore"]
        print(f"z-optimisation: {e['z_gflops']:.0f} GFLOP at {e['z_gflops_per_second']:.1f} GFLOP/s = "
              f"{100 * e['z_utilisation_of_matmul_peak']:.0f} % of the matmul peak")
    return result, ratio


def batch_sizes_part(bench: Bench, requests, methods, batch_sizes) -> list[dict]:
    """Each method's time per edit at each batch size (the first requests), each from a freshly loaded model, after
    one untimed warm-up edit."""
    timed_edit(bench, methods[0], requests[:2])
    runs = []
    for method in methods:
        for batch in batch_sizes:
            report = timed_edit(bench, method, requests[:batch])[2]
            runs.append({"method": method, "batch_size": batch, "seconds_per_edit": report.seconds["total"] / batch,
                         "profile_seconds": report.seconds, "z_steps": z_steps(report),
                         "mpes_stopped": mpes_stops(report)})
            print(f"{method:>10} batch {batch:>3}: {runs[-1]['seconds_per_edit']:.2f} s/edit "
                  f"({z_steps(report)} z-steps; profile "
                  f"{', '.join(f'{k} {v:.1f}' for k, v in report.seconds.items())})", flush=True)
    return runs


FULL_RUN = ("statistics", "reference", "methods")  # the sections of a run without --parts: it starts afresh
PARTS = (*FULL_RUN, "batch_sizes")
DEFAULT_BATCH_SIZES = [1, 20]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model's name or a model folder")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--reference-edits", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=["encore", "memit", "alphaedit"])
    parser.add_argument("--stats-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each method is timed, in alternating order (2: A B C C B A)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                        help=f"sections to run (default: {' '.join(FULL_RUN)}, and batch_sizes with --batch-sizes); "
                             "the others are kept from an existing --out file")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, metavar="N",
                        help=f"time each method at these batch sizes too (section batch_sizes; with --parts "
                             f"batch_sizes and no sizes: {' '.join(map(str, DEFAULT_BATCH_SIZES))})")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: the CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an EncoreConfig setting for every run (e.g. max_tokens_per_forward=32768 on a GPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parts = args.parts or [*FULL_RUN, *(["batch_sizes"] if args.batch_sizes else [])]
    batch_sizes = args.batch_sizes or DEFAULT_BATCH_SIZES
    if min(batch_sizes) < 1:
        parser.error("--batch-sizes must be positive")
    out = Path(args.out or f"docs/results/speed-{args.model}.json")
    torch.manual_seed(0)

    bench = Bench(model_directory(args.model), args.device, parse_settings(args.set))
    bench.config()  # a bad setting fails before anything runs
    cases = counterfact_cases(count=max([args.edits, *(batch_sizes if "batch_sizes" in parts else [])]))
    requests = edit_requests(cases)
    n_ref = min(args.reference_edits or args.edits, args.edits)
    results = json.loads(out.read_text()) if out.is_file() and not set(FULL_RUN) <= set(parts) else {}
    description = machine(args.device)
    peak = bench.matmul_peak_gflops()
    print(f"machine: {description}; fp32 matmul peak {peak:.1f} GFLOP/s", flush=True)
    results.update({"model": args.model, "edits": args.edits, "machine": description})
    if "command" in results:  # written before sections were recorded apart: all of it came from one command
        earlier = {"command": results.pop("command"), "matmul_peak_gflops": results.pop("matmul_peak_gflops")}
        results["runs"] = {part: dict(earlier) for part in FULL_RUN}
    runs = results.setdefault("runs", {})
    for part in parts:
        runs[part] = {"command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "matmul_peak_gflops": peak}

    if "statistics" in parts:
        results["statistics"] = statistics_part(bench, args.stats_tokens)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["HF_ENCORE_CACHE"] = cache  # C₀ computed once here, then shared by every run below
        if "reference" in parts:
            results["reference_edits"] = n_ref
            results["reference_comparison"] = reference_part(bench, cases[:n_ref], requests[:n_ref])
        if "methods" in parts:
            results["methods"], results["encore_over_memit"] = methods_part(bench, requests[: args.edits],
                                                                            args.methods, peak, args.rounds)
        if "batch_sizes" in parts:
            results["batch_sizes"] = batch_sizes_part(bench, requests, args.methods, batch_sizes)
        del os.environ["HF_ENCORE_CACHE"]

    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
