"""Quickstart: write two facts into SmolLM2-135M with ENCORE, check them, save the adapter and load it back.

    python examples/quickstart.py [--out edits/]
"""

import argparse

import torch

import hf_encore
from hf_encore import EncoreConfig, get_encore_model, load_model
from hf_encore.data import data_dir
from hf_encore.evaluation import continuation_nll

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="edits")
args = parser.parse_args()

base, tokenizer = load_model()  # the built-in SmolLM2-135M, fetched and cached on first use
corpus = data_dir() / "corpus" / "wikitext-2-valid.txt"  # generic text for the statistics C₀
model = get_encore_model(base, EncoreConfig(method="encore"), tokenizer=tokenizer, corpus=corpus)

requests = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
]
report = model.edit(requests)
print(report)

prompts = [r["prompt"].format(r["subject"]) for r in requests]
targets = [" " + r["target_new"] for r in requests]
p_edited = (-continuation_nll(model, tokenizer, prompts, targets)).exp()
with model.disable_adapter():
    p_base = (-continuation_nll(model, tokenizer, prompts, targets)).exp()
for prompt, target, before, after in zip(prompts, targets, p_base, p_edited):
    print(f"{prompt!r} → {target!r}: p = {before:.3f} before, {after:.3f} after")

model.save_pretrained(args.out)
reloaded = hf_encore.from_pretrained(load_model()[0], args.out, tokenizer=tokenizer)
p_reloaded = (-continuation_nll(reloaded, tokenizer, prompts, targets)).exp()
assert torch.allclose(p_reloaded, p_edited, atol=1e-5), "the reloaded adapter should give the same answers"
print(f"saved to {args.out}/ and reloaded: same probabilities")
