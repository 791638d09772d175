"""CounterFact metrics (ALGORITHM.md §7): efficacy, generalisation, specificity by mean per-token NLL."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..editing.requests import target_token_ids
from ..editing.tracing import chunk_by_tokens, pad_right


@torch.no_grad()
def continuation_nll(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                     max_tokens: int = 4096) -> torch.Tensor:
    """Mean per-token NLL of each continuation after its prompt, teacher-forced. → [n]."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs, starts, targets = [], [], []
    for prompt, cont in zip(prompts, continuations):
        p_ids = list(tokenizer(prompt)["input_ids"])
        t_ids = target_token_ids(tokenizer, cont)
        seqs.append(p_ids + t_ids[:-1])
        starts.append(len(p_ids) - 1)
        targets.append(t_ids)
    out = torch.empty(len(seqs))
    device = next(model.parameters()).device
    for chunk in chunk_by_tokens([len(s) for s in seqs], max_tokens):
        ids, mask = pad_right([seqs[i] for i in chunk], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for row, i in enumerate(chunk):
            t = torch.tensor(targets[i], device=device)
            logp = logits[row, starts[i]: starts[i] + len(t)].log_softmax(-1)
            out[i] = -logp.gather(1, t.unsqueeze(1)).mean().cpu()
    return out


def counterfact_scores(model, tokenizer, cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """ES, PS, NS (fractions) and their harmonic mean S over ``cases`` (records from ``load_counterfact``)."""
    def better(prompts, first, second):
        a = continuation_nll(model, tokenizer, prompts, first)
        b = continuation_nll(model, tokenizer, prompts, second)
        return (a < b).float()

    new = [c["target_new"] for c in cases]
    true = [c["target_true"] for c in cases]
    es = better([c["prompt"].replace("{}", c["subject"]) for c in cases], new, true)
    ps = better([c["rephrase_prompt"] for c in cases], new, true)
    loc = [c["locality_ground_truth"] or c["target_true"] for c in cases]
    ns = better([c["locality_prompt"] for c in cases], loc, new)
    means = {"ES": float(es.mean()), "PS": float(ps.mean()), "NS": float(ns.mean())}
    vals = list(means.values())
    means["S"] = 0.0 if min(vals) == 0 else len(vals) / sum(1 / v for v in vals)
    means["per_case"] = {"ES": es.tolist(), "PS": ps.tolist(), "NS": ns.tolist()}
    return means
