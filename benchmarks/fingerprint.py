"""Time of the base-model fingerprint computed when an adapter is attached (it checks the base and keys the statistics
cache): the sampled per-part fingerprint (hf_encore.fingerprint.parts_fingerprint) against a full hash of every
weight (what the statistics cache used to be keyed by), on the built-in model and on one decoder block shaped like
Llama-3-8B's (bf16), scaled to its 32 blocks. Prints figures, writes JSON.

    python benchmarks/fingerprint.py --out docs/results/fingerprint.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_encore.architectures import resolve_layout
from hf_encore.fingerprint import (
    PARTS_FINGERPRINT_SAMPLES,
    edited_weights_fingerprint,
    parts_fingerprint,
    tensors_fingerprint,
)
from hf_encore.loading import ensure_builtin, load_model

from common import machine, write_json


def seconds(work, repeats: int) -> float:
    """The best of ``repeats`` timed runs, after one untimed run."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def measure(model, repeats: int) -> dict:
    layout = resolve_layout(model, None, None)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "sampled_s": seconds(lambda: parts_fingerprint(model, layout), repeats),
            # What attaching hashes in full besides the sample: W_out of one edited layer.
            "one_w_out_full_s": seconds(lambda: edited_weights_fingerprint(model, layout, [0]), repeats),
            "full_s": seconds(lambda: tensors_fingerprint(list(model.named_parameters())
                                                          + list(model.named_buffers())), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": machine(), "samples_per_tensor": PARTS_FINGERPRINT_SAMPLES}
    results[args.model] = measure(load_model(str(ensure_builtin(args.model)))[0], args.repeats)
    block = LlamaConfig(vocab_size=128, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                        num_attention_heads=32, num_key_value_heads=8)
    one = measure(LlamaForCausalLM(block).to(torch.bfloat16), args.repeats)
    results["llama3-8b-block-bf16"] = {**one, "x32_blocks_sampled_s": 32 * one["sampled_s"],
                                        "x32_blocks_full_s": 32 * one["full_s"],
                                        # attaching an adapter on five edited layers of the full model
                                        "attach_estimate_s": 32 * one["sampled_s"] + 5 * one["one_w_out_full_s"]}
    print(write_json(args.out, results, indent=1) if args.out else json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
