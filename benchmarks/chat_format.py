"""Editing Instruct models through plain prompts or through their chat template, asked both ways.

    python benchmarks/chat_format.py --models smollm2-135m qwen2.5-0.5b --edits 100 --batch-size 25 \\
        --out docs/results/chat-format.json

For each model and each edit form (``EncoreConfig.prompt_format``: ``plain``, ``chat``), ENCORE with its defaults
edits the first ``--edits`` counterfact-train cases in sequential batches on a fresh model, and the record holds
ES/PS/NS (and S, EM/PM/NM) of the edited facts asked in *both* forms (plain text; the user's message in the chat
template, the target starting the reply), before and after, the z-steps, MPES stops, seconds per edit and the
largest ‖W‖/‖W₀‖. The unedited scores are measured once per model and base dtype (``--dtype``, float32 by default;
records without a ``dtype`` are float32). A rerun skips the (model, dtype, form) runs already in ``--out``
(resumable); ``--threads`` sets torch's CPU threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_encore import EncoreConfig
from hf_encore.editing.prompt_format import PROMPT_FORMATS, prompt_format
from hf_encore.evaluation import counterfact_scores, weight_norms

from common import counterfact_cases, edit_requests, encore_model, machine, mpes_stops, write_json, z_steps


def scores_in_both_forms(model, tokenizer, cases) -> dict[str, dict[str, float]]:
    out = {}
    for name in PROMPT_FORMATS:
        scores = counterfact_scores(model, tokenizer, cases, form=prompt_format(tokenizer, name))
        out[name] = {k: v for k, v in scores.items() if k != "per_case"}
    return out


def run(model_name: str, dtype: str, edit_form: str, cases, batch_size: int, with_unedited: bool) -> dict[str, Any]:
    model, tokenizer = encore_model(model_name, EncoreConfig(method="encore", prompt_format=edit_form),
                                    dtype=getattr(torch, dtype))
    record: dict[str, Any] = {"model": model_name, "dtype": dtype, "edit_form": edit_form, "edits": len(cases),
                              "batch_size": batch_size}
    if with_unedited:
        with model.disable_adapter():
            record["unedited"] = scores_in_both_forms(model, tokenizer, cases)
    requests = edit_requests(cases)
    model.base_model.compute_statistics(progress=False)  # C₀ computed (or read from the cache) outside the timing
    steps = stops = 0
    seconds = 0.0
    for start in range(0, len(requests), batch_size):
        tick = time.perf_counter()
        report = model.edit(requests[start: start + batch_size], progress=False)
        seconds += time.perf_counter() - tick
        steps, stops = steps + z_steps(report), stops + mpes_stops(report)
        print(f"  {model_name} {edit_form}: {start + batch_size} edits, {seconds:.0f} s", file=sys.stderr, flush=True)
    record["edited"] = scores_in_both_forms(model, tokenizer, cases)
    record.update(z_steps_per_edit=steps / len(cases), mpes_stopped=stops, seconds_per_edit=seconds / len(cases),
                  max_norm_ratio=max(n["norm_ratio"] for n in weight_norms(model).values()))
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--forms", nargs="+", choices=PROMPT_FORMATS, default=list(PROMPT_FORMATS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the base's dtype (bfloat16 runs about twice as fast on a CPU with native bf16)")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs/results/chat-format.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    cases = counterfact_cases("train", count=args.edits)
    for model_name in args.models:
        for form in args.forms:
            same_base = [r for r in results["runs"]
                         if r["model"] == model_name and r.get("dtype", "float32") == args.dtype]
            if any(r["edit_form"] == form and r["edits"] == args.edits for r in same_base):
                continue
            with_unedited = not any("unedited" in r for r in same_base)
            record = run(model_name, args.dtype, form, cases, args.batch_size, with_unedited)
            record.update(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          command="python " + " ".join(sys.argv))
            results["runs"].append(record)
            results.update(part="chat-format", data=f"counterfact-train.json, first {args.edits} cases",
                           method="encore (defaults)")
            print(write_json(out, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
