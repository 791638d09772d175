"""Merge and export: fold the edits into the weights and write a plain transformers model, usable without
hf_encore or PEFT.

    python examples/merge_and_export.py [--out merged/]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from hf_encore import EncoreConfig, get_encore_model, load_model
from hf_encore.data import data_dir

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="merged")
args = parser.parse_args()

base, tokenizer = load_model()
model = get_encore_model(base, EncoreConfig(), tokenizer=tokenizer,
                         corpus=data_dir() / "corpus" / "wikitext-2-valid.txt")
model.edit([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}])

# merge_adapter() / unmerge_adapter() switch in place and back (exactly); merge_and_unload() returns the plain model.
merged = model.merge_and_unload()
merged.save_pretrained(args.out)
tokenizer.save_pretrained(args.out)

exported = AutoModelForCausalLM.from_pretrained(args.out)
ids = tokenizer("LeBron James plays the sport of", return_tensors="pt")
with torch.no_grad():
    answer = exported.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(f"{args.out}/ answers: {tokenizer.decode(answer[0, ids['input_ids'].shape[1]:])!r}")
