"""The one primitive every metric is built on: a model's teacher-forced log-probabilities of continuations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..editing.prompt_format import PLAIN, PromptFormat
from ..editing.tracing import MAX_LOGITS, chunk_by_tokens, lm_parts, pad_right, token_log_probs
from ..placement import input_device


@dataclass
class ContinuationScores:
    """Per item: log p of each continuation token [len_i], whether it was the argmax there [len_i], and the argmax
    token there [len_i]."""

    token_logprobs: list[torch.Tensor]
    token_correct: list[torch.Tensor]
    token_predictions: list[torch.Tensor]

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
                        max_tokens: int = 4096, max_logits: int = MAX_LOGITS, progress: bool = False,
                        form: PromptFormat = PLAIN) -> ContinuationScores:
    """Teacher-forced scores of ``continuations[i]`` after ``prompts[i]``.

    The prompt is tokenised as the model sees text (with BOS if the tokenizer adds one); the continuation as a
    continuation (a leading space, no special tokens), so multi-token targets are scored token by token. Under a
    chat ``form`` the prompt is the user's message and the continuation the start of the reply.
    ``max_tokens`` bounds the tokens of one decoder pass, ``max_logits`` the logits held at once.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    seqs, starts, targets = [], [], []
    for prompt, cont in zip(prompts, continuations):
        p_ids = form.encode(tokenizer, prompt)
        t_ids = form.target_ids(tokenizer, cont)
        seqs.append(p_ids + t_ids[:-1])
        starts.append(len(p_ids) - 1)
        targets.append(t_ids)
    logprobs: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    correct: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    predicted: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    decoder, unembedding, logit_map = lm_parts(model)
    device = input_device(model)
    # Only the positions that predict continuation tokens go through the unembedding, a few rows at a time: on a
    # 262k vocabulary (Gemma-3) every position's logits would cost more memory and arithmetic than the decoder.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    chunks = [[order[j] for j in chunk] for chunk in chunk_by_tokens([len(seqs[i]) for i in order], max_tokens)]
    for chunk in tqdm(chunks, desc="scoring", disable=not progress, leave=False):
        ids, mask = pad_right([seqs[i] for i in chunk], pad_token_id(tokenizer))
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        rows = torch.cat([torch.full((len(targets[i]),), row) for row, i in enumerate(chunk)])
        positions = torch.cat([torch.arange(starts[i], starts[i] + len(targets[i])) for i in chunk])
        labels = torch.tensor([t for i in chunk for t in targets[i]], device=device)
        log_p, argmax = token_log_probs(hidden[rows.to(device), positions.to(device)], labels, unembedding, logit_map,
                                        max_logits)  # [m], [m]
        sizes = [len(targets[i]) for i in chunk]
        for i, lp, ok, top in zip(chunk, log_p.cpu().split(sizes), (argmax == labels).cpu().split(sizes),
                                  argmax.cpu().split(sizes)):
            logprobs[i], correct[i], predicted[i] = lp, ok, top
    return ContinuationScores(logprobs, correct, predicted)


def continuation_nll(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                     max_tokens: int = 4096, form: PromptFormat = PLAIN) -> torch.Tensor:
    """Mean per-token NLL of each continuation after its prompt, teacher-forced. → [n]."""
    return score_continuations(model, tokenizer, prompts, continuations, max_tokens=max_tokens, form=form).mean_nll
