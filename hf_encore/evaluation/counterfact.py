"""CounterFact metrics (docs/algorithm.md §7): efficacy, generalisation, specificity, their harmonic mean, the
probability-difference magnitudes, and fluency (n-gram entropy of generated text)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch

from ..editing.prompt_format import PLAIN, PromptFormat
from ..placement import input_device
from .scoring import continuation_nll, pad_token_id


def harmonic_mean(values: Sequence[float]) -> float:
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def counterfact_scores(model, tokenizer, cases: Sequence[dict[str, Any]], *, fluency: bool = False,
                       fluency_tokens: int = 100, max_tokens: int = 4096, form: PromptFormat = PLAIN) -> dict[str, Any]:
    """ES, PS, NS (fractions), S (their harmonic mean), the magnitudes EM, PM, NM (mean probability differences:
    p(new) − p(true) on rewrite and paraphrase prompts, p(true) − p(new) on neighbourhood prompts, with p the
    per-token geometric mean), and optionally fluency GE over ``cases`` (records from ``load_counterfact``), every
    prompt read through ``form`` (plain text, or the user turn of the chat template)."""
    def probabilities(prompts, continuations):
        return (-continuation_nll(model, tokenizer, prompts, continuations, max_tokens, form)).exp()

    new = [c["target_new"] for c in cases]
    true = [c["target_true"] for c in cases]
    groups = {
        "ES": ([c["prompt"].replace("{}", c["subject"]) for c in cases], new, true),
        "PS": ([c["rephrase_prompt"] for c in cases], new, true),
        "NS": ([c["locality_prompt"] for c in cases], [c["locality_ground_truth"] or c["target_true"] for c in cases],
               new),
    }
    results: dict[str, Any] = {"per_case": {}}
    for name, (prompts, wanted, unwanted) in groups.items():
        p_wanted, p_unwanted = probabilities(prompts, wanted), probabilities(prompts, unwanted)
        results[name] = float((p_wanted > p_unwanted).float().mean())
        results[name[0] + "M"] = float((p_wanted - p_unwanted).mean())
        results["per_case"][name] = (p_wanted > p_unwanted).float().tolist()
    results["S"] = harmonic_mean([results["ES"], results["PS"], results["NS"]])
    if fluency:
        results["GE"] = generated_fluency(model, tokenizer, [c["prompt"].replace("{}", c["subject"]) for c in cases],
                                          fluency_tokens, form)
    return results


def generated_fluency(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                      form: PromptFormat = PLAIN) -> float:
    """GE (docs/algorithm.md §7): n-gram entropy of ``max_new_tokens`` tokens sampled (top-k 5, seeded) from each
    prompt (read through ``form``), averaged over the prompts."""
    return generation_entropy(generate(model, tokenizer, [form.wrap(p) for p in prompts], max_new_tokens,
                                       add_special_tokens=form.add_special_tokens))


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy (bits) of the frequency distribution of the n-grams of ``tokens``."""
    grams = Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def generation_entropy(texts: Sequence[str]) -> float:
    """Fluency as ROME/MEMIT measure it: per text (H2 + 2·H3)/3 over its bi- and trigrams of words, averaged."""
    if not texts:
        raise ValueError("no texts to measure")
    scores = []
    for text in texts:
        words = text.split()
        scores.append((ngram_entropy(words, 2) + 2 * ngram_entropy(words, 3)) / 3)
    return sum(scores) / len(scores)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100, top_k: int = 5, seed: int = 0,
             batch_size: int = 16, add_special_tokens: bool = True) -> list[str]:
    """Seeded top-k sampling of continuations (the generated text only); ``add_special_tokens=False`` for prompts
    that carry their own (a rendered chat template)."""
    device = input_device(model)
    texts: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(list(prompts[start: start + batch_size]), return_tensors="pt", padding=True,
                                  add_special_tokens=add_special_tokens)
                out = model.generate(**batch.to(device), do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad_token_id(tokenizer))
                texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return texts
