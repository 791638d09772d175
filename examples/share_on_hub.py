"""Share edits: push an adapter (deltas, editing state, ledger, model card) to the Hugging Face Hub.

    python examples/share_on_hub.py --repo-id me/sports-edits [--private] [--endpoint URL]

Anyone can then use the edits with ``hf_encore.from_pretrained(None, "me/sports-edits")`` (the base model is read
from the adapter config; this one, made on the built-in SmolLM2, by its built-in name), or with plain PEFT:
``PeftModel.from_pretrained(base, "me/sports-edits")``.
"""

import argparse

import hf_encore
from hf_encore import EncoreConfig, get_encore_model, load_model
from hf_encore.data import data_dir

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repo-id", required=True)
parser.add_argument("--private", action="store_true")
parser.add_argument("--endpoint", default=None, help="another Hub endpoint (default: huggingface.co)")
parser.add_argument("--token", default=None, help="default: the token saved by `hf auth login`")
args = parser.parse_args()

base, tokenizer = load_model()
model = get_encore_model(base, EncoreConfig(), tokenizer=tokenizer,
                         corpus=data_dir() / "corpus" / "wikitext-2-valid.txt")
model.edit([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}])

commit = hf_encore.push_to_hub(model, args.repo_id, private=args.private or None, token=args.token,
                               endpoint=args.endpoint, delta_dtype="bfloat16")
print(f"pushed: {commit.commit_url}")
