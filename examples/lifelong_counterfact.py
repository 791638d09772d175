"""Lifelong editing: CounterFact facts written in sequential batches, with efficacy, generalisation, specificity
and the edited matrices' norms after every batch.

    python examples/lifelong_counterfact.py [--edits 200] [--batch-size 50] [--method encore]

For the full benchmark (downstream tasks, perplexity, plots, resumable) use ``hf-encore bench``.
"""

import argparse

from hf_encore import EncoreConfig, get_encore_model, load_model
from hf_encore.data import data_dir, load_counterfact
from hf_encore.evaluation import counterfact_scores, weight_norms

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--edits", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=50)
parser.add_argument("--method", default="encore", choices=["encore", "memit", "alphaedit"])
args = parser.parse_args()

base, tokenizer = load_model()
model = get_encore_model(base, EncoreConfig(method=args.method), tokenizer=tokenizer,
                         corpus=data_dir() / "corpus" / "wikitext-2-valid.txt")
cases = load_counterfact(limit=args.edits)  # prompt, subject, target_new + rephrase and neighbourhood prompts

print(f"{'edits':>6} {'ES':>5} {'PS':>5} {'NS':>5} {'max ‖W‖/‖W₀‖':>13} {'s/edit':>7}")
for start in range(0, len(cases), args.batch_size):
    batch = cases[start: start + args.batch_size]
    report = model.edit([{k: c[k] for k in ("prompt", "subject", "target_new")} for c in batch], progress=False)
    edited = cases[: start + len(batch)]
    scores = counterfact_scores(model, tokenizer, edited)  # all facts edited so far
    ratio = max(layer["norm_ratio"] for layer in weight_norms(model).values())
    print(f"{len(edited):>6} {scores['ES']:>5.2f} {scores['PS']:>5.2f} {scores['NS']:>5.2f} {ratio:>13.4f} "
          f"{report.seconds['total'] / len(batch):>7.2f}")
