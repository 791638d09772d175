"""Are the facts a lifelong run loses the ones its edits bleed into? Per relation, after a run of the ablation.

    python benchmarks/degradation_bleed.py --run runs/ablation-smollm2/defaults \\
        --json docs/results/degradation-bleed-smollm2.json

Reads a finished lifelong run (``hf_encore.apps.lifelong``: its settings, probe facts and last saved adapter) and,
for every probe fact (a fact the unedited model knew, never edited), whether the edited model still gets it and
what it predicts instead. A CounterFact relation is its prompt template (``"The mother tongue of {} is"``). It
reports retention by whether the fact's relation was edited (and how often), and, for the facts lost, how many now
predict the first token of a new object that an edit of the same relation wrote: the signature of an edit that
spread past its subject to the relation as a whole.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch

from hf_encore import from_pretrained, load_model
from hf_encore.apps.lifelong import choose_edits
from hf_encore.data import load_counterfact
from hf_encore.editing.prompt_format import PLAIN
from hf_encore.evaluation.scoring import score_continuations

from common import machine, write_json


def first_token(tokenizer, text: str) -> int:
    """The first token of ``text`` as a continuation of a plain prompt (as the scores tokenise it)."""
    return PLAIN.target_ids(tokenizer, text)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a lifelong run's folder (holding settings.json)")
    parser.add_argument("--method", default="encore")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    run = Path(args.run)
    settings = json.loads((run / "settings.json").read_text())
    probe = json.loads((run / "probe_facts.json").read_text())
    adapter = run / args.method.replace("+", "_") / "adapter"
    state = json.loads((adapter / "encore_state.json").read_text())
    edited = choose_edits(load_counterfact(settings["data"]), probe, settings["edits"], settings["seed"])
    edited = edited[: state["num_edits"]]

    if not probe:
        raise SystemExit(f"{run} has no probe facts (it ran with --known-facts 0): nothing to compare")
    base, tokenizer = load_model(settings["model"])
    model = from_pretrained(base, adapter, tokenizer=tokenizer, corpus=settings.get("corpus"))
    prompts = [c["prompt"].replace("{}", c["subject"]) for c in probe]
    scores = score_continuations(model, tokenizer, prompts, [c["target_true"] for c in probe])
    kept = [bool(ok.all()) for ok in scores.token_correct]
    predicted = [int(p[0]) for p in scores.token_predictions]  # the argmax where the true object's first token was

    edits_per_relation = Counter(c["prompt"] for c in edited)
    new_objects = defaultdict(set)  # relation → first tokens of the new objects its edits wrote
    for c in edited:
        new_objects[c["prompt"]].add(first_token(tokenizer, c["target_new"]))
    any_new_object = set().union(*new_objects.values()) if new_objects else set()

    groups: dict[str, list[bool]] = {"relation edited": [], "relation not edited": []}
    by_relation = defaultdict(lambda: {"probe_facts": 0, "kept": 0})
    lost_to_same_relation = lost_to_any_edit = lost = 0
    for case, ok, token in zip(probe, kept, predicted):
        relation = case["prompt"]
        groups["relation edited" if edits_per_relation[relation] else "relation not edited"].append(ok)
        by_relation[relation]["probe_facts"] += 1
        by_relation[relation]["kept"] += ok
        if not ok:
            lost += 1
            lost_to_same_relation += token in new_objects.get(relation, ())
            lost_to_any_edit += token in any_new_object
    relations = sorted(({"relation": r, "edits": edits_per_relation[r], **v} for r, v in by_relation.items()),
                       key=lambda r: -r["edits"])
    result = {
        "run": str(run), "method": args.method, "edits": len(edited), "probe_facts": len(probe),
        "retained": sum(kept) / len(kept),
        "retained_by_group": {g: {"facts": len(v), "retained": (sum(v) / len(v)) if v else None}
                              for g, v in groups.items()},
        "lost": lost,
        "lost_now_predicting_a_new_object_of_the_same_relation": lost_to_same_relation,
        "lost_now_predicting_a_new_object_of_any_edit": lost_to_any_edit,
        "relations": relations,
        "machine": machine(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "relations"}, indent=1))
    for r in relations[:15]:
        print(f"{r['edits']:4d} edits  {r['kept']:3d}/{r['probe_facts']:<3d} kept  {r['relation']}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    with torch.no_grad():
        main()
