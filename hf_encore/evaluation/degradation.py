"""Degradation measures that still carry signal on 100M–500M-parameter models, where MMLU sits at chance:
perplexity on held-out text, retained knowledge on facts the unedited model knows, and the edited matrices' norms.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..editing.corpus import packed_chunks
from ..editing.tracing import MAX_LOGITS, ModelAccess, chunk_by_tokens, lm_parts, pad_right, token_log_probs
from ..layer import Linear
from ..placement import input_device
from .scoring import pad_token_id, score_continuations


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], *, n_tokens: int = 20_000, seq_len: int = 256,
               max_tokens: int = 4096, max_logits: int = MAX_LOGITS, progress: bool = False) -> float:
    """exp(mean next-token NLL) over the first ``n_tokens`` tokens of ``texts``, in chunks of ``seq_len``.

    ``max_tokens`` bounds the tokens of one decoder pass, ``max_logits`` the logits held at once: the NLL comes
    from the final hidden states through the unembedding in chunks, since a pass's full logits on a 262k
    vocabulary (Gemma-3) would take 1 GiB per 1,024 tokens, with copies.
    """
    chunks = packed_chunks(tokenizer, texts, n_tokens, seq_len)
    decoder, unembedding, logit_map = lm_parts(model)
    device = input_device(model)
    total_nll, count = 0.0, 0
    for group in tqdm(chunk_by_tokens([len(c) for c in chunks], max_tokens), desc="perplexity",
                      disable=not progress, leave=False):
        ids, mask = pad_right([chunks[i] for i in group], pad_token_id(tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]  # [B, T-1, d]
        real = mask[:, 1:].bool()
        log_p, _ = token_log_probs(hidden[real], ids[:, 1:][real], unembedding, logit_map, max_logits)
        total_nll -= float(log_p.double().sum())
        count += int(real.sum())
    return math.exp(total_nll / count)


def known_facts(model, tokenizer, cases: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` CounterFact cases whose true object the model gets right: every token of it is the
    argmax, teacher-forced, after the prompt (none for ``limit`` 0)."""
    if limit <= 0:
        return []
    chosen: list[dict[str, Any]] = []
    block = max(64, 4 * limit)  # score only as many cases as it takes to find ``limit``
    for start in range(0, len(cases), block):
        part = cases[start: start + block]
        prompts = [c["prompt"].replace("{}", c["subject"]) for c in part]
        correct = score_continuations(model, tokenizer, prompts, [c["target_true"] for c in part]).token_accuracy
        chosen += [c for c, ok in zip(part, correct.tolist()) if ok == 1.0]
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def retained_knowledge(model, tokenizer, facts: Sequence[dict[str, Any]]) -> float:
    """Fraction of ``facts`` (from :func:`known_facts` on the unedited model) the model still gets right."""
    if not facts:
        raise ValueError("no facts to check")
    prompts = [c["prompt"].replace("{}", c["subject"]) for c in facts]
    accuracy = score_continuations(model, tokenizer, prompts, [c["target_true"] for c in facts]).token_accuracy
    return float((accuracy == 1.0).float().mean())


def edited_layers(model, adapter_name: str = "default") -> tuple[ModelAccess, dict[int, Linear]]:
    """The model's :class:`ModelAccess` and, per layer the adapter edits, its wrapped W_out (holding the delta)."""
    tuner = getattr(model, "base_model", model)
    config = tuner.peft_config[adapter_name]
    access = ModelAccess(tuner.model, tuner._layout(config))
    modules = {}
    for layer in config.layers:
        module = access.w_out(layer)
        if not isinstance(module, Linear) or adapter_name not in module.encore_delta:
            raise ValueError(f"layer {layer} carries no delta of adapter {adapter_name!r}")
        modules[layer] = module
    return access, modules


@torch.no_grad()
def weight_norms(model, adapter_name: str = "default") -> dict[int, dict[str, float]]:
    """Per edited layer: ‖W₀ + ΔW‖_F / ‖W₀‖_F for the adapter's delta ΔW, and ‖ΔW‖_F."""
    norms = {}
    for layer, module in edited_layers(model, adapter_name)[1].items():
        base = module.original_weight.double()
        delta = module.get_delta_weight(adapter_name).double()
        norms[layer] = {"norm_ratio": float((base + delta).norm() / base.norm()), "delta_norm": float(delta.norm())}
    return norms
