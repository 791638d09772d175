"""How fast the zero-configuration path samples its C₀ text: tokens per second of ``generated_corpus`` by batch size.

    python benchmarks/generated_corpus.py --model smollm2-135m --batch-sizes 1 16 64 --tokens 15360 \\
        --out docs/results/generated-corpus-smollm2-135m.json

With no corpus, ``get_encore_model(base)`` samples ``stats_n_tokens`` tokens of text from the model before its first
edit (10·d_k: 15,360 for SmolLM2). Batch size 1 is how it sampled before batching; it is timed on ``--tokens-single``
tokens only (the rate, not the total, is what compares).
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_encore import load_model
from hf_encore.editing.corpus import generated_corpus

from common import machine, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=15_360)
    parser.add_argument("--tokens-single", type=int, default=1024, help="tokens timed at batch size 1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    rows = []
    for batch in args.batch_sizes:
        n_tokens = args.tokens_single if batch == 1 else args.tokens
        start = time.perf_counter()
        texts = generated_corpus(model, tokenizer, n_tokens, batch=batch)
        seconds = time.perf_counter() - start
        produced = sum(len(tokenizer(t)["input_ids"]) for t in texts.texts)
        rows.append({"batch": batch, "tokens": produced, "seconds": seconds, "tokens_per_second": produced / seconds})
        print(f"batch {batch:3d}: {produced} tokens in {seconds:.1f} s, {produced / seconds:.1f} tokens/s", flush=True)
    if args.out:
        write_json(args.out, {"model": args.model, "machine": machine(), "stats_n_tokens": args.tokens,
                              "rows": rows})


if __name__ == "__main__":
    with torch.no_grad():
        main()
