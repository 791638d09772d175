"""Exporting an edited adapter as a PEFT LoRA adapter, and as a merged model in the base's dtype: ranks, file sizes
and how far the exported models' logits are from the adapter's.

    python benchmarks/lora_export.py --model smollm2-135m --edits 100 --batch-size 25 --ranks 64 16 \\
        --out docs/results/lora-export-smollm2-135m.json

ENCORE with its defaults edits the first ``--edits`` counterfact-train cases; the adapter is saved, then exported as
a LoRA adapter at each delta's numerical rank (exact) and at each of ``--ranks``, each loaded by plain PEFT on a
fresh base; the merged model is written in float32 and in bfloat16 (``merge_and_unload``, ``save_pretrained``) and
loaded back. For every export: the largest absolute logit difference from the adapter over the edited prompts, the
relative Frobenius error of the deltas, the rewrite accuracy (p(new) > p(true) on the edit prompts) and the files'
size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_encore import EncoreConfig, from_pretrained, load_model
from hf_encore.evaluation import counterfact_scores

from common import counterfact_cases, edit_requests, encore_model, machine, write_json


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.no_grad()
def logits_of(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    return [model(**tokenizer(p, return_tensors="pt")).logits[0, -1].float() for p in prompts]


def compare(model, tokenizer, prompts, reference, cases) -> dict[str, Any]:
    got = logits_of(model, tokenizer, prompts)
    scores = counterfact_scores(model, tokenizer, cases)
    return {"max_abs_logit_difference": max(float((a - b).abs().max()) for a, b in zip(got, reference)),
            "ES": scores["ES"], "PS": scores["PS"], "NS": scores["NS"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--ranks", type=int, nargs="*", default=[64, 16])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs/results/lora-export-smollm2-135m.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import PeftModel

    cases = counterfact_cases("train", count=args.edits)
    prompts = [c["prompt"].replace("{}", c["subject"]) for c in cases]
    model, tokenizer = encore_model(args.model, EncoreConfig(method="encore"))
    tick = time.perf_counter()
    requests = edit_requests(cases)
    for start in range(0, len(requests), args.batch_size):
        model.edit(requests[start: start + args.batch_size], progress=False)
    edit_seconds = time.perf_counter() - tick
    reference = logits_of(model, tokenizer, prompts)
    record: dict[str, Any] = {"model": args.model, "edits": args.edits, "edit_seconds": edit_seconds,
                              "adapter": compare(model, tokenizer, prompts, reference, cases)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "adapter", save_editing_state=False)
        record["adapter"]["bytes"] = folder_bytes(tmp / "adapter")
        record["lora"] = []
        for rank in [None, *args.ranks]:
            where = tmp / f"lora-{rank or 'exact'}"
            report = model.to_lora(where, rank=rank)
            lora = PeftModel.from_pretrained(load_model(args.model)[0], where).eval()
            row = {"rank_asked": rank, "ranks": [x.rank for x in report],
                   "numerical_ranks": [x.numerical_rank for x in report],
                   "max_relative_error": max(x.relative_error for x in report),
                   "lora_parameters": sum(x.lora_parameters for x in report),
                   "dense_parameters": sum(x.dense_parameters for x in report),
                   "bytes": folder_bytes(where), **compare(lora, tokenizer, prompts, reference, cases)}
            record["lora"].append(row)
            print(row, file=sys.stderr, flush=True)
        record["merged"] = []
        for dtype in ("float32", "bfloat16"):
            edited = from_pretrained(load_model(args.model)[0], tmp / "adapter")
            merged = edited.merge_and_unload().to(getattr(torch, dtype))
            merged.save_pretrained(tmp / f"merged-{dtype}")
            tokenizer.save_pretrained(tmp / f"merged-{dtype}")
            del edited, merged
            loaded = load_model(str(tmp / f"merged-{dtype}"), dtype=getattr(torch, dtype))[0]
            row = {"dtype": dtype, "bytes": folder_bytes(tmp / f"merged-{dtype}"),
                   **compare(loaded, tokenizer, prompts, reference, cases)}
            record["merged"].append(row)
            print(row, file=sys.stderr, flush=True)
    record.update(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  command="python " + " ".join(sys.argv))
    print(write_json(args.out, record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
