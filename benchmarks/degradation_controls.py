"""Why do known facts go? Controls on a finished lifelong run: is it the size of the edits or their direction?

    python benchmarks/degradation_controls.py --run runs/ablation-smollm2/defaults \\
        runs/ablation-smollm2/preservation-4 --json docs/results/degradation-controls-smollm2.json

Reads each finished lifelong run (``hf_encore.apps.lifelong``: settings, probe facts, last saved adapter) and measures,
on the run's probe facts (facts the unedited model knew, never edited):

- **retention by confidence**: the facts kept, split into quartiles of the unedited model's log-probability of the
  true object (summed over its tokens). If the lost facts are mostly the ones the model barely knew, the edits
  tip over fragile facts rather than erase solid ones.
- **same size, other directions**: each edited layer's delta ΔW [d_v, d_k] replaced by (a) Gaussian noise of the
  same Frobenius norm, and (b) ΔW Q for a random orthogonal Q [d_k, d_k], which keeps ΔW's singular values and
  output directions and moves only the key directions it reads. If the run's own ΔW loses far more facts than
  these, the damage is in where the edits point, not in how large they are.
- **disturbance by text**: per edited layer, tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ) with C the second moment of the layer's
  keys over (i) the probe facts' prompts and (ii) held-out WikiText-2 test text: how much the update changes the
  MLP's output, relative to the output itself, on factual prompts against the generic text C₀ is estimated from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_encore import from_pretrained, load_model
from hf_encore.editing.stats import second_moments
from hf_encore.evaluation.degradation import edited_layers
from hf_encore.evaluation.scoring import pad_token_id, score_continuations

from common import data_path, machine, write_json


def probe_texts(probe: list[dict]) -> tuple[list[str], list[str]]:
    return [c["prompt"].replace("{}", c["subject"]) for c in probe], [c["target_true"] for c in probe]


def kept_and_logprob(model, tokenizer, probe: list[dict]) -> tuple[list[bool], list[float]]:
    """Per probe fact: whether every token of the true object is the argmax, and its summed log-probability."""
    prompts, objects = probe_texts(probe)
    scores = score_continuations(model, tokenizer, prompts, objects)
    return [bool(c.all()) for c in scores.token_correct], [float(lp.sum()) for lp in scores.token_logprobs]


def key_moments(model, access, layers: list[int], token_lists: list[list[int]], pad_id: int) -> dict[int, torch.Tensor]:
    """Per layer, the unedited model's uncentred second moment of W_out's inputs over ``token_lists`` (the step
    that measures C₀). → [d_k, d_k]."""
    with model.disable_adapter():
        return second_moments(access, token_lists, layers, pad_id, max_tokens=4096, progress=False)[0]


def relative_disturbance(delta: torch.Tensor, base: torch.Tensor, moment: torch.Tensor) -> float:
    """tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ) for ΔW, W₀ [d_v, d_k] and C [d_k, d_k]."""
    delta, base = delta.double(), base.double()
    return float(((delta @ moment) * delta).sum() / ((base @ moment) * base).sum())


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def analyse(run: Path, method: str, seeds: int, text_tokens: int) -> dict:
    """The three measures above for one finished run (``seeds`` random deltas per control)."""
    settings = json.loads((run / "settings.json").read_text())
    probe = json.loads((run / "probe_facts.json").read_text())
    if not probe:
        raise SystemExit(f"{run} has no probe facts (it ran with --known-facts 0): nothing to compare")
    adapter = run / method.replace("+", "_") / "adapter"
    state = json.loads((adapter / "encore_state.json").read_text())
    base, tokenizer = load_model(settings["model"])
    model = from_pretrained(base, adapter, tokenizer=tokenizer, corpus=settings.get("corpus"))
    access, modules = edited_layers(model)
    deltas = {layer: m.encore_delta["default"].data.clone() for layer, m in modules.items()}

    with model.disable_adapter():
        known, logprob = kept_and_logprob(model, tokenizer, probe)
    if not all(known):
        print(f"note: {len(known) - sum(known)} probe facts are not known by the unedited model as loaded here")
    kept, _ = kept_and_logprob(model, tokenizer, probe)

    order = sorted(range(len(probe)), key=lambda i: logprob[i])
    quartiles = []
    for q in range(4):
        part = order[q * len(order) // 4: (q + 1) * len(order) // 4]
        if part:
            quartiles.append({"facts": len(part), "unedited_logprob_range": [logprob[part[0]], logprob[part[-1]]],
                              "retained": sum(kept[i] for i in part) / len(part)})

    controls: dict[str, list[float]] = {"gaussian_same_norm": [], "rotated_key_directions": []}
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(seeds):
            for layer, m in modules.items():
                d = deltas[layer]
                noise = torch.randn(d.shape, generator=generator, dtype=torch.float64)
                m.encore_delta["default"].data = (noise * d.double().norm() / noise.norm()).to(d.dtype)
            controls["gaussian_same_norm"].append(sum(kept_and_logprob(model, tokenizer, probe)[0]) / len(probe))
            for layer, m in modules.items():
                d = deltas[layer]
                q = random_orthogonal(d.shape[1], generator)
                m.encore_delta["default"].data = (d.double() @ q).to(d.dtype)
            controls["rotated_key_directions"].append(sum(kept_and_logprob(model, tokenizer, probe)[0]) / len(probe))
    finally:
        for layer, m in modules.items():
            m.encore_delta["default"].data = deltas[layer]

    prompts, _ = probe_texts(probe)
    probe_tokens = [tokenizer(p)["input_ids"] for p in prompts]
    text = data_path("corpus", "wikitext-2-test.txt").read_text()
    ids = tokenizer(text[: 20 * text_tokens])["input_ids"][:text_tokens]
    text_tokens_lists = [ids[i: i + 256] for i in range(0, len(ids), 256)]
    pad_id, layers = pad_token_id(tokenizer), list(modules)
    probe_moment = key_moments(model, access, layers, probe_tokens, pad_id)
    text_moment = key_moments(model, access, layers, text_tokens_lists, pad_id)
    disturbance = {}
    for layer, m in modules.items():
        w0 = m.original_weight
        disturbance[layer] = {"probe_prompts": relative_disturbance(deltas[layer], w0, probe_moment[layer]),
                              "wikitext": relative_disturbance(deltas[layer], w0, text_moment[layer])}
    return {
        "run": str(run), "method": method, "edits": state["num_edits"], "probe_facts": len(probe),
        "retained": sum(kept) / len(kept),
        "retained_by_unedited_confidence_quartile": quartiles,
        "controls": {k: {"retained": v, "mean": sum(v) / len(v)} for k, v in controls.items()},
        "relative_disturbance": disturbance,
    }


def table(runs: dict[str, dict]) -> str:
    """One markdown row per run: retained by its deltas and by the controls, by confidence, and the disturbance."""
    lines = ["| run | retained | same-norm noise | rotated key directions | by confidence quartile (least → most) "
             "| disturbance, probe prompts / WikiText-2, per layer |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        controls = {k: f"{v['mean']:.3f} ({min(v['retained']):.3f}–{max(v['retained']):.3f})"
                    for k, v in r["controls"].items()}
        quartiles = " / ".join(f"{q['retained']:.2f}" for q in r["retained_by_unedited_confidence_quartile"])
        disturbance = ", ".join(f"{v['probe_prompts']:.3f} / {v['wikitext']:.3f}"
                                for v in r["relative_disturbance"].values())
        lines.append(f"| {name} | {r['retained']:.3f} | {controls['gaussian_same_norm']} | "
                     f"{controls['rotated_key_directions']} | {quartiles} | {disturbance} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, nargs="+", help="lifelong runs' folders (each holding settings.json)")
    parser.add_argument("--method", default="encore")
    parser.add_argument("--seeds", type=int, default=3, help="random deltas per control")
    parser.add_argument("--text-tokens", type=int, default=8192, help="held-out WikiText-2 tokens for the disturbance")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = {}
    for folder in args.run:
        runs[Path(folder).name] = result = analyse(Path(folder), args.method, args.seeds, args.text_tokens)
        print(json.dumps(result, indent=1))
    print(table(runs))
    if args.json:
        write_json(args.json, {"runs": runs, "seeds": args.seeds, "text_tokens": args.text_tokens,
                               "machine": machine()})


if __name__ == "__main__":
    with torch.no_grad():
        main()
