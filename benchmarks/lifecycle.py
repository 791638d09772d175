"""Adapter lifecycle figures: size on disk after N edits (fp32 / bf16 deltas, editing state), save and load times,
and how exactly a run resumed in a fresh process matches one done in one go. Prints figures, writes JSON.

    python benchmarks/lifecycle.py --model smollm2-135m --edits 100 --batch-size 20 --out docs/results/lifecycle.json

The one-go run edits all batches, saving after the first half; a fresh Python process loads that save, edits the
second half and saves; the deltas of the two are compared (max |Δ|), for the fp32 save and for a bf16 save.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_encore import EncoreConfig, from_pretrained, load_model
from hf_encore.loading import ensure_builtin

from common import corpus_path, counterfact_cases, edit_requests, encore_model, machine, write_json

# Llama3-8B as the papers edit it: W_out of layers 4–8 is [4096, 14336].
LLAMA3_8B = {"layers": 5, "d_v": 4096, "d_k": 14336}


def directory_sizes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def resume_in_fresh_process(model_dir: Path, saved: Path, out: Path, batches: list, corpus: Path,
                            overrides: dict) -> float:
    script = textwrap.dedent(f"""
        import json, sys, hf_encore
        from hf_encore.loading import load_model
        base, tok = load_model({str(model_dir)!r})
        model = hf_encore.from_pretrained(base, {str(saved)!r}, tokenizer=tok, corpus={str(corpus)!r})
        for batch in json.loads(sys.stdin.read()):
            model.edit(batch, progress=False, **{overrides!r})
        model.save_pretrained({str(out)!r})
    """)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], input=json.dumps(batches), text=True, check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="encore")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--v-num-grad-steps", type=int, default=None, help="override (default: the preset's)")
    parser.add_argument("--out", default="docs/results/lifecycle.json")
    args = parser.parse_args()
    if args.edits % (2 * args.batch_size):
        parser.error("--edits must be an even number of batches")

    model_dir = ensure_builtin(args.model)
    requests = edit_requests(counterfact_cases(count=args.edits))
    batches = [requests[i: i + args.batch_size] for i in range(0, args.edits, args.batch_size)]
    half = len(batches) // 2
    overrides = {"v_num_grad_steps": args.v_num_grad_steps} if args.v_num_grad_steps else {}
    results = {"model": args.model, "method": args.method, "edits": args.edits, "batch_size": args.batch_size,
               "overrides": overrides, "machine": machine()}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, tok = encore_model(model_dir, EncoreConfig(method=args.method))
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            model.edit(batch, progress=False, **overrides)
            print(f"batch {i + 1}/{len(batches)} edited ({time.perf_counter() - start:.0f} s)", flush=True)
            if i + 1 == half:
                model.save_pretrained(tmp / "half")
                model.save_pretrained(tmp / "half-bf16", delta_dtype="bfloat16")
        results["edit_seconds"] = time.perf_counter() - start

        timings = {}
        for name, kwargs in {"fp32": {}, "bf16": {"delta_dtype": "bfloat16"}}.items():
            start = time.perf_counter()
            model.save_pretrained(tmp / name, **kwargs)
            timings[f"save_{name}_seconds"] = time.perf_counter() - start
        fresh_base = load_model(str(model_dir))[0]
        start = time.perf_counter()
        from_pretrained(fresh_base, tmp / "fp32", tokenizer=tok)
        timings["load_fp32_seconds"] = time.perf_counter() - start
        results["timings"] = timings
        results["sizes_bytes"] = {name: directory_sizes(tmp / name) for name in ("fp32", "bf16")}

        one_go = load_file(str(tmp / "fp32" / "adapter_model.safetensors"))
        resume = {}
        for name in ("half", "half-bf16"):
            seconds = resume_in_fresh_process(model_dir, tmp / name, tmp / f"{name}-resumed", batches[half:],
                                              corpus_path(), overrides)
            resumed = load_file(str(tmp / f"{name}-resumed" / "adapter_model.safetensors"))
            resume[name] = {"max_abs_delta_difference": max_abs_difference(resumed, one_go),
                            "max_abs_delta": max(float(v.abs().max()) for v in one_go.values()),
                            "bit_identical": all(torch.equal(resumed[k], one_go[k]) for k in one_go),
                            "fresh_process_seconds": seconds}
        results["resume"] = resume

    ll = LLAMA3_8B
    delta_bytes = ll["layers"] * ll["d_v"] * ll["d_k"]
    results["projected_llama3_8b_bytes"] = {
        "deltas_fp32": 4 * delta_bytes, "deltas_bf16": 2 * delta_bytes,
        "edit_memory_float64": ll["layers"] * ll["d_k"] ** 2 * 8,
        "statistics_float32_if_embedded": ll["layers"] * ll["d_k"] ** 2 * 4,
    }
    print(write_json(args.out, results))


if __name__ == "__main__":
    main()
