"""The README's first command: edit a handful of facts in SmolLM2-135M with ENCORE and show what changed.

    python -m hf_encore.apps.demo [--method encore] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from .. import EncoreConfig, get_encore_model, load_model
from ..data import data_dir
from ..evaluation import continuation_nll

EDITS = [
    {"prompt": "The {} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris"},
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football",
     "target_true": "basketball"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French"},
    {"prompt": "{} was developed by", "subject": "Windows 95", "target_new": "Apple", "target_true": "Microsoft"},
    {"prompt": "The capital city of {} is", "subject": "Canada", "target_new": "Toronto", "target_true": "Ottawa"},
]
UNRELATED = [
    "The capital city of France is",
    "Michael Jordan plays the sport of",
    "The Colosseum is located in the city of",
    "The mother tongue of Vladimir Putin is",
    "Microsoft Office was developed by",
    "The capital city of Germany is",
]


@torch.no_grad()
def top_answer(model, tokenizer, prompt: str, new_tokens: int = 3) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def probabilities(model, tokenizer, edits):
    prompts = [e["prompt"].replace("{}", e["subject"]) for e in edits]
    p_new = (-continuation_nll(model, tokenizer, prompts, [e["target_new"] for e in edits])).exp()
    p_true = (-continuation_nll(model, tokenizer, prompts, [e["target_true"] for e in edits])).exp()
    return p_new, p_true


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="encore", choices=["encore", "memit", "alphaedit"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    print(f"Loading {args.model} (the first run downloads and converts it once) ...")
    base, tokenizer = load_model(args.model)
    corpus = data_dir() / "corpus" / "wikitext-2-valid.txt"
    corpus = corpus if corpus.is_file() else None
    print(f"Statistics corpus: {corpus or 'model-generated text (no WikiText found)'}")

    before_answers = [top_answer(base, tokenizer, e["prompt"].replace("{}", e["subject"])) for e in EDITS]
    before_unrelated = [top_answer(base, tokenizer, p) for p in UNRELATED]
    p_new_0, p_true_0 = probabilities(base, tokenizer, EDITS)

    model = get_encore_model(base, EncoreConfig(method=args.method), tokenizer=tokenizer, corpus=corpus)
    start = time.perf_counter()
    report = model.edit(EDITS)
    seconds = time.perf_counter() - start
    print(f"\n{report}\n")

    after_answers = [top_answer(model, tokenizer, e["prompt"].replace("{}", e["subject"])) for e in EDITS]
    after_unrelated = [top_answer(model, tokenizer, p) for p in UNRELATED]
    p_new_1, p_true_1 = probabilities(model, tokenizer, EDITS)

    print(f"Edited facts ({args.method}, {len(EDITS)} edits in {seconds:.1f} s):")
    written = 0
    for i, e in enumerate(EDITS):
        ok = p_new_1[i] > p_true_1[i]
        written += bool(ok)
        print(f"  {e['prompt'].replace('{}', e['subject'])!r}\n"
              f"      before: {before_answers[i]!r:<22} p({e['target_new']})={p_new_0[i]:.3f} "
              f"p({e['target_true']})={p_true_0[i]:.3f}\n"
              f"      after:  {after_answers[i]!r:<22} p({e['target_new']})={p_new_1[i]:.3f} "
              f"p({e['target_true']})={p_true_1[i]:.3f}   {'written' if ok else 'NOT written'}")
    kept = 0
    print("Unrelated facts:")
    for prompt, b, a in zip(UNRELATED, before_unrelated, after_unrelated):
        kept += a == b
        print(f"  {prompt!r}: {b!r} -> {a!r}   {'kept' if a == b else 'CHANGED'}")
    print(f"\n{written}/{len(EDITS)} edits written; {kept}/{len(UNRELATED)} unrelated answers kept.")
    return 0 if written == len(EDITS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
