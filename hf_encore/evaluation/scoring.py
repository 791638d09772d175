"""The one primitive every metric is built on: a model's teacher-forced log-probabilities of continuations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..editing.requests import target_token_ids
from ..editing.tracing import chunk_by_tokens, pad_right


@dataclass
class ContinuationScores:
    """Per item: log p of each continuation token [len_i], and whether it was the argmax there [len_i]."""

    token_logprobs: list[torch.Tensor]
    token_correct: list[torch.Tensor]

    @property
    def mean_nll(self) -> torch.Tensor:
        """Mean per-token negative log-likelihood of each continuation. → [n]."""
        return torch.stack([-lp.mean() for lp in self.token_logprobs])

    @property
    def token_accuracy(self) -> torch.Tensor:
        """Fraction of each continuation's tokens that were the argmax (teacher-forced). → [n]."""
        return torch.stack([c.float().mean() for c in self.token_correct])


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def score_continuations(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *,
                        max_tokens: int = 4096, progress: bool = False) -> ContinuationScores:
    """Teacher-forced scores of ``continuations[i]`` after ``prompts[i]``.

    The prompt is tokenised as the model sees text (with BOS if the tokenizer adds one); the continuation as a
    continuation (a leading space, no special tokens), so multi-token targets are scored token by token.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    seqs, starts, targets = [], [], []
    for prompt, cont in zip(prompts, continuations):
        p_ids = list(tokenizer(prompt)["input_ids"])
        t_ids = target_token_ids(tokenizer, cont)
        seqs.append(p_ids + t_ids[:-1])
        starts.append(len(p_ids) - 1)
        targets.append(t_ids)
    logprobs: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    correct: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    device = next(model.parameters()).device
    # Logits only at the positions that predict continuation tokens: on a 262k vocabulary (Gemma-3) unembedding
    # every position takes more arithmetic than the decoder blocks. Sequences are ordered by where their continuation
    # starts, so the positions a chunk keeps (the same for all its rows) form a short range.
    order = sorted(range(len(seqs)), key=lambda i: (starts[i], len(seqs[i])))
    chunks = [[order[j] for j in chunk] for chunk in chunk_by_tokens([len(seqs[i]) for i in order], max_tokens)]
    for chunk in tqdm(chunks, desc="scoring", disable=not progress, leave=False):
        ids, mask = pad_right([seqs[i] for i in chunk], pad_token_id(tokenizer))
        first, last = min(starts[i] for i in chunk), max(starts[i] + len(targets[i]) for i in chunk)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=torch.arange(first, last, device=device)).logits
        offset = 0 if logits.shape[1] == ids.shape[1] else first  # a model may ignore logits_to_keep
        for row, i in enumerate(chunk):
            t = torch.tensor(targets[i], device=device)
            step_logits = logits[row, starts[i] - offset: starts[i] - offset + len(t)].float()
            logprobs[i] = step_logits.log_softmax(-1).gather(1, t.unsqueeze(1)).squeeze(1).cpu()
            correct[i] = (step_logits.argmax(-1) == t).cpu()
    return ContinuationScores(logprobs, correct)


def continuation_nll(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                     max_tokens: int = 4096) -> torch.Tensor:
    """Mean per-token NLL of each continuation after its prompt, teacher-forced. → [n]."""
    return score_continuations(model, tokenizer, prompts, continuations, max_tokens=max_tokens).mean_nll
