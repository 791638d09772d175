"""Seconds per edit for each method on a built-in model, and the statistics time; prints figures, writes JSON.

    python benchmarks/edit_speed.py --model smollm2-135m --batch-sizes 1 20 --out docs/results/edit_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from hf_encore import EncoreConfig, get_encore_model, load_model
from hf_encore.data import data_dir, load_counterfact
from hf_encore.loading import ensure_builtin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["encore", "memit", "alphaedit"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 20])
    parser.add_argument("--out", default="docs/results/edit_speed.json")
    args = parser.parse_args()

    model_dir = ensure_builtin(args.model)
    corpus = data_dir() / "corpus" / "wikitext-2-valid.txt"
    cases = load_counterfact(data_dir() / "counterfact" / "counterfact-train.json")
    results = {"model": args.model, "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads", "runs": []}

    # Statistics from an empty cache, timed on their own.
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_ENCORE_CACHE"] = tmp
        base, tok = load_model(str(model_dir))
        model = get_encore_model(base, EncoreConfig(), tokenizer=tok, corpus=corpus)
        start = time.perf_counter()
        stats = model.base_model.compute_statistics(progress=False)
        seconds = time.perf_counter() - start
        tokens = next(iter(stats.values())).n_tokens
        results["statistics"] = {"seconds": seconds, "tokens": tokens, "layers": len(stats),
                                 "tokens_per_second": tokens / seconds}
        print(f"statistics: {len(stats)} layers, {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tok/s)")
        del os.environ["HF_ENCORE_CACHE"]

    for method in args.methods:
        for batch in args.batch_sizes:
            base, tok = load_model(str(model_dir))
            model = get_encore_model(base, EncoreConfig(method=method), tokenizer=tok, corpus=corpus)
            model.base_model.compute_statistics(progress=False)  # cached: not part of the edit time
            report = model.edit(cases[:batch], progress=False)
            run = {"method": method, "batch_size": batch, "seconds": report.seconds,
                   "seconds_per_edit": report.seconds["total"] / batch,
                   "z_steps": sum(r.steps for r in report.requests),
                   "mpes_stopped": sum(r.mpes_stopped for r in report.requests)}
            results["runs"].append(run)
            print(f"{method:>10} batch {batch:>3}: {run['seconds_per_edit']:.2f} s/edit "
                  f"(z {report.seconds['targets']:.1f} s, keys {report.seconds['keys']:.1f} s, "
                  f"solve {report.seconds['solve']:.1f} s, steps {run['z_steps']})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
