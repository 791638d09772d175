"""Step 1: the target hidden state z of every request at the critical layer L, optimised as one batch with MPES.

Each request r has its own δ_r ∈ R^{d_v}, its own Adam state and its own stopping decision; requests that stop
leave the batch. δ_r is added at the subject's last token, so nothing below block L and nothing before that token
can change: block L's outputs and the attention keys/values of the earlier positions are computed once
(``ModelAccess.prefix_states``), and each step runs only the blocks above L, only on the positions from the subject's
last token on (about a quarter of the tokens, since the context templates come first), and computes logits only at
the target and KL positions (docs/algorithm.md §2–3).

Sequence layout: request r owns sequences ``r·(P+1) … r·(P+1)+P``: its P rewriting prompts (one per context
template, the raw ``"{}"`` first), then its KL prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .requests import PreparedRequest
from .tracing import ModelAccess, PrefixStates, chunk_by_tokens, pad_right

LOSS_THRESHOLD = 5e-2


@dataclass(frozen=True)
class TargetSettings:
    lr: float
    lr_relative: bool  # lr in units of each request's median_i |h_r,i| (else as written): see step_sizes
    num_steps: int
    clamp_norm_factor: float
    weight_decay: float
    kl_factor: float
    mpes: bool
    mpes_extra_steps: int
    mpes_check_raw_prompt: bool
    max_tokens_per_forward: int


@dataclass
class TargetResult:
    z: torch.Tensor  # [n, d_v]
    h_init: torch.Tensor  # [n, d_v]
    steps: list[int]  # optimiser steps taken per request
    mpes_stopped: list[bool]
    p_target_before: list[float]  # p(target | raw prompt) before any edit of this batch
    final_loss: list[float]


class RowAdam:
    """Adam on the rows of a [n, d] tensor, each row with its own step count and learning rate (a float: the same
    for every row, or [n]); torch's defaults otherwise."""

    def __init__(self, n: int, d: int, lr: float | torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8,
                 device: torch.device | str | None = None) -> None:
        self.lr = torch.as_tensor(lr, dtype=torch.float64, device=device).expand(n)
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.m = torch.zeros(n, d, device=device)
        self.v = torch.zeros(n, d, device=device)
        self.t = torch.zeros(n, dtype=torch.float64, device=device)  # 1 − β^t loses digits in float32

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
        """Update ``param[rows]`` with ``grad[rows]``; other rows and their state are untouched."""
        g = grad[rows]
        self.t[rows] += 1
        self.m[rows] = self.beta1 * self.m[rows] + (1 - self.beta1) * g
        self.v[rows] = self.beta2 * self.v[rows] + (1 - self.beta2) * g * g
        t = self.t[rows].unsqueeze(1)
        # The same arithmetic as torch.optim.Adam, so results match it to rounding.
        denom = self.v[rows].sqrt() / (1 - self.beta2**t).sqrt().float() + self.eps
        param[rows] -= (self.lr[rows].unsqueeze(1) / (1 - self.beta1**t)).float() * self.m[rows] / denom


def step_sizes(settings: TargetSettings, h_init: torch.Tensor) -> torch.Tensor:
    """Each request's Adam learning rate, from its hidden state h_init [n, d] at the critical layer. → [n] float64.

    Adam moves every coordinate by about lr per step, so a relative step scales with the coordinates it changes. The
    median is the scale: a few channels carry massive activations (Gemma-3: max |h_i| ≈ 3000, median ≈ 10), and an
    RMS-relative step, dominated by them, is far too large for the rest (sweep in docs/results.md).
    """
    if not settings.lr_relative:
        return torch.full((h_init.shape[0],), settings.lr, dtype=torch.float64, device=h_init.device)
    return settings.lr * h_init.abs().median(dim=1).values.double()


@dataclass
class _Layout:
    """Flattened sequences of a batch and where their target tokens are."""

    ids: list[list[int]]  # [S] token ids
    lookup: torch.Tensor  # [S] subject's last token per sequence
    tok_seq: torch.Tensor  # [M] sequence of each target token
    tok_pos: torch.Tensor  # [M] position whose logits predict it
    tok_label: torch.Tensor  # [M] the token id
    tok_checked: torch.Tensor  # [M] bool: counts for the MPES argmax check
    target_len: torch.Tensor  # [n]
    per_request: int  # P + 1
    kl_seq: torch.Tensor = field(init=False)  # [n]
    raw_seq: torch.Tensor = field(init=False)  # [n]

    def __post_init__(self):
        n = len(self.target_len)
        self.raw_seq = torch.arange(n) * self.per_request
        self.kl_seq = self.raw_seq + self.per_request - 1


def build_layout(prepared: list[PreparedRequest], check_raw_prompt: bool) -> _Layout:
    ids, lookup, tok_seq, tok_pos, tok_label, tok_checked = [], [], [], [], [], []
    n_prompts = len(prepared[0].prompts)
    for req in prepared:
        for t, prompt in enumerate(req.prompts):
            s = len(ids)
            ids.append(prompt.ids + req.target_ids[:-1])
            lookup.append(prompt.subject_last)
            for j, label in enumerate(req.target_ids):
                tok_seq.append(s)
                tok_pos.append(len(prompt.ids) - 1 + j)
                tok_label.append(label)
                # The reference code checks only the prefixed prompts; with no prefixes the raw one is all there is.
                tok_checked.append(t > 0 or check_raw_prompt or n_prompts == 1)
        ids.append(req.kl_prompt.ids)
        lookup.append(req.kl_prompt.subject_last)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return _Layout(ids, as_long(lookup), as_long(tok_seq), as_long(tok_pos), as_long(tok_label),
                   torch.tensor(tok_checked), as_long([len(r.target_ids) for r in prepared]), n_prompts + 1)


def _pad_suffixes(prefix: PrefixStates) -> torch.Tensor:
    """Block L's output from each sequence's split position on, right-padded: [S, T, d], on their device."""
    pieces = [out[int(split):] for out, split in zip(prefix.block_output, prefix.split)]
    out = torch.zeros(len(pieces), max(p.shape[0] for p in pieces), pieces[0].shape[1], device=pieces[0].device)
    for row, piece in enumerate(pieces):
        out[row, : piece.shape[0]] = piece
    return out


def optimise_targets(
    access: ModelAccess,
    prepared: list[PreparedRequest],
    layer: int,
    settings: TargetSettings,
    pad_id: int,
    progress: bool = True,
) -> TargetResult:
    """Find z_r = h_r + δ_r at block ``layer``'s output for every request (docs/algorithm.md §2–3)."""
    n = len(prepared)
    device = access.block_device(layer)  # δ, its optimiser and the bookkeeping live beside block L
    lay = build_layout(prepared, settings.mpes_check_raw_prompt)  # index bookkeeping stays on the CPU
    per = lay.per_request
    # Each context template's prompts start with the template's tokens: those run once per template.
    templated = [[r * per + j for r in range(n)] for j in range(1, per - 1)]
    prefix = access.prefix_states(lay.ids, lay.lookup.tolist(), layer, pad_id, settings.max_tokens_per_forward,
                                  shared_groups=templated)
    suffix_ids = [seq[int(prefix.split[s]):] for s, seq in enumerate(lay.ids)]
    suffix_hidden = _pad_suffixes(prefix)  # [S, T, d] on the model's device, sliced per chunk below
    tok_suffix_pos = (lay.tok_pos - prefix.split[lay.tok_seq]).to(device)  # [M] target positions in the suffixes
    tok_label, tok_checked = lay.tok_label.to(device), lay.tok_checked.to(device)  # [M]
    target_len = lay.target_len.to(device)  # [n]
    d = prefix.block_output[0].shape[1]
    h_init = torch.stack([prefix.block_output[s][lay.lookup[s]] for s in lay.raw_seq.tolist()])  # [n, d]
    h_norm = h_init.norm(dim=1)  # [n]
    delta = torch.zeros(n, d, device=device, requires_grad=True)
    adam = RowAdam(n, d, step_sizes(settings, h_init), device=device)
    log_p0 = [None] * n  # KL reference distributions, recorded at iteration 0
    mpes_count = [0] * n
    steps = [0] * n
    stopped_by_mpes = [False] * n
    p_before = [0.0] * n
    final_loss = [float("nan")] * n
    active = list(range(n))
    request_tokens = [sum(len(suffix_ids[r * per + j]) for j in range(per)) for r in range(n)]
    n_rewrite = per - 1

    bar = tqdm(total=settings.num_steps, desc="z-optimisation", disable=not progress, leave=False)
    for it in range(settings.num_steps):
        if not active:
            break
        delta.grad = None
        continuing: list[int] = []
        for chunk_pos in chunk_by_tokens([request_tokens[r] for r in active], settings.max_tokens_per_forward):
            reqs = [active[i] for i in chunk_pos]
            seqs = [r * per + j for r in reqs for j in range(per)]
            row_of_seq = torch.full((len(lay.ids),), -1, dtype=torch.long)
            row_of_seq[seqs] = torch.arange(len(seqs))
            batch_ids, mask = pad_right([suffix_ids[s] for s in seqs], pad_id)
            local_req = torch.arange(len(reqs)).repeat_interleave(per)  # [rows]
            reqs_t = torch.tensor(reqs)
            reqs_d = reqs_t.to(device)
            # δ_r is added at the subject's last token of every prompt of request r: the first suffix position.
            rows_d = torch.arange(len(seqs), device=device)
            hidden = suffix_hidden[torch.tensor(seqs, device=device), : batch_ids.shape[1]].index_put(
                (rows_d, torch.zeros_like(rows_d)), delta[reqs_d[local_req.to(device)]], accumulate=True)
            final = access.replay_suffix(layer, prefix, seqs, hidden, batch_ids, mask).to(device)  # [rows, T, d]

            tok = (row_of_seq[lay.tok_seq] >= 0).nonzero().squeeze(1)  # [m] target tokens of this chunk
            tok_rows = row_of_seq[lay.tok_seq[tok]]
            tok_req = local_req[tok_rows]  # [m] local request index
            tok_d, tok_req_d = tok.to(device), tok_req.to(device)
            labels = tok_label[tok_d]
            tok_logp, tok_argmax = access.token_log_probs(final[tok_rows.to(device), tok_suffix_pos[tok_d]],
                                                          labels)  # [m], [m]
            tok_len = target_len[reqs_d[tok_req_d]].float()
            nll = torch.zeros(len(reqs), device=device).index_add(0, tok_req_d, -tok_logp / tok_len) / n_rewrite
            argmax_ok = (tok_argmax == labels) | ~tok_checked[tok_d]
            all_ok = torch.ones(len(reqs), device=device).scatter_reduce(0, tok_req_d, argmax_ok.float(), "amin")

            kl_rows = row_of_seq[lay.kl_seq[reqs_t]]
            kl_logq = access.logits(final[kl_rows.to(device), 0]).log_softmax(-1)  # [r, V]: at the lookup
            if it == 0:
                raw_tok = (lay.tok_seq[tok] == lay.raw_seq[reqs_t[tok_req]]).to(device)
                raw_p = torch.zeros(len(reqs), device=device).index_add(
                    0, tok_req_d[raw_tok], tok_logp[raw_tok].detach()).exp().tolist()
                for i, r in enumerate(reqs):
                    log_p0[r] = kl_logq[i].detach()
                    p_before[r] = raw_p[i]
            log_p0_chunk = torch.stack([log_p0[r] for r in reqs])
            kl = settings.kl_factor * (kl_logq.exp() * (kl_logq - log_p0_chunk)).sum(-1)  # KL(p_δ ‖ p_0)
            wd = settings.weight_decay * delta[reqs_d].norm(dim=1) / h_norm[reqs_d] ** 2
            loss = nll + kl + wd  # [r]
            # One device-to-host copy per chunk: the stopping decisions are made here, per request.
            loss_values, ok_values = loss.detach().cpu(), all_ok.bool().cpu()
            if not torch.isfinite(loss_values).all():
                bad = [reqs[i] for i in (~torch.isfinite(loss_values)).nonzero().squeeze(1).tolist()]
                raise FloatingPointError(f"non-finite z-optimisation loss for request(s) {bad} at step {it}")

            keep = torch.zeros(len(reqs), dtype=torch.bool)
            for i, r in enumerate(reqs):
                final_loss[r] = float(loss_values[i])
                if settings.mpes and bool(ok_values[i]):
                    mpes_count[r] += 1
                    if mpes_count[r] == settings.mpes_extra_steps + 1:
                        stopped_by_mpes[r] = True
                        continue
                if final_loss[r] < LOSS_THRESHOLD or it == settings.num_steps - 1:
                    continue
                keep[i] = True
            if keep.any():
                loss[keep.to(device)].sum().backward()
            continuing += [r for i, r in enumerate(reqs) if keep[i]]

        if continuing:
            rows = torch.tensor(continuing, device=device)
            with torch.no_grad():
                adam.step(delta, delta.grad, rows)
                limit = settings.clamp_norm_factor * h_norm[rows]
                norms = delta[rows].norm(dim=1)
                scale = torch.where(norms > limit, limit / norms.clamp_min(1e-12), torch.ones_like(norms))
                delta[rows] *= scale.unsqueeze(1)
            for r in continuing:
                steps[r] += 1
        active = continuing
        bar.update(1)
        bar.set_postfix(active=len(active))
    bar.close()
    z = (h_init + delta.detach()).cpu()
    return TargetResult(z, h_init.cpu(), steps, stopped_by_mpes, p_before, final_loss)


@torch.no_grad()
def target_probabilities(access: ModelAccess, prepared: list[PreparedRequest], pad_id: int,
                         max_tokens: int) -> torch.Tensor:
    """p(target | raw prompt) for every request, teacher-forced, on the current model. → [n]."""
    ids = [req.prompts[0].ids + req.target_ids[:-1] for req in prepared]
    out = torch.empty(len(prepared))
    for chunk in chunk_by_tokens([len(s) for s in ids], max_tokens):
        batch_ids, mask = pad_right([ids[i] for i in chunk], pad_id)
        final = access.final_hidden(batch_ids, mask)
        for row, i in enumerate(chunk):
            start = len(prepared[i].prompts[0].ids) - 1
            targets = torch.tensor(prepared[i].target_ids, device=final.device)
            logp = access.logits(final[row, start: start + len(targets)]).log_softmax(-1)
            out[i] = float(logp.gather(1, targets.unsqueeze(1)).sum().exp())
    return out
