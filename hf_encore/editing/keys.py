"""Keys K (inputs of W_out at the subject's last token) and block-L outputs H on the current model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .requests import PreparedRequest
from .tracing import ModelAccess, chunk_by_tokens, own_tail_shared_length, pad_right


@dataclass
class KeyPassInputs:
    """The key prompts of a batch, cut after the subject's last token and chunked, with the residual stream
    entering the first edited block.

    Keys are read at the subject's last token, so later tokens never matter (causal attention), and updates to
    edited layers cannot change anything below the first of them: blocks 0..``start``-1 run once per batch, not
    once per edited layer. The raw prompts, the only ones whose block-L output is needed, form their own chunks,
    so the prefixed prompts stop at the key layer. The prompts of one context template start with the same
    tokens: those run once per template and layer, and the prompts continue from that pass's cache.
    """

    chunks: list[list[int]]  # prompt indices per forward pass
    raw: list[bool]  # whether a chunk holds raw prompts (run up to block L) or prefixed ones
    shared: list[int]  # per chunk, the index in ``shared_ids`` of the tokens its prompts start with, or -1
    shared_ids: list[list[int]]  # tokens a group of prompts has in common, from position 0
    ids: list[torch.Tensor]  # per chunk [B, T]: each prompt's own tokens (after the shared ones), right-padded
    masks: list[torch.Tensor]  # per chunk [B, P + T]: the P shared positions, then the own tokens' mask
    hidden: list[torch.Tensor] | None  # per chunk [B, T, d]: output of block start-1; None when start == 0
    start: int
    read_at: torch.Tensor  # [N] position read in each prompt's own tokens (the subject's last token)
    per_request: int  # prompts per request: the raw prompt first, then the prefixed ones


def _prompt_groups(cut: list[list[int]], per: int) -> list[tuple[list[int], int]]:
    """Prompts grouped by their place in a request (raw, then each context template), each with the number of
    leading tokens its prompts share; a shared part always leaves each prompt at least its last token."""
    groups = []
    for j in range(per):
        members = list(range(j, len(cut), per))
        shares = j > 0 and len(members) > 1
        groups.append((members, own_tail_shared_length([cut[i] for i in members]) if shares else 0))
    return groups


@torch.no_grad()
def key_pass_inputs(
    access: ModelAccess, prepared: list[PreparedRequest], first_layer: int, pad_id: int, max_tokens: int
) -> KeyPassInputs:
    """Cut, group and chunk the key prompts and run their own tokens once through the blocks below
    ``first_layer``."""
    prompts = [p for req in prepared for p in req.prompts]
    per = len(prepared[0].prompts)
    cut = [p.ids[: p.subject_last + 1] for p in prompts]
    read_at = torch.tensor([p.subject_last for p in prompts])
    chunks, raw, shared, shared_ids, ids, masks, hidden = [], [], [], [], [], [], []
    for place, (members, n_shared) in enumerate(_prompt_groups(cut, per)):
        group = -1
        lower_cache = None
        if n_shared:
            group = len(shared_ids)
            shared_ids.append(cut[members[0]][:n_shared])
            if first_layer > 0:
                lower_cache = access.shared_prefix(shared_ids[-1], first_layer - 1)[0]
        read_at[members] -= n_shared
        for chunk_pos in chunk_by_tokens([len(cut[i]) - n_shared for i in members], max_tokens):
            chunk = [members[j] for j in chunk_pos]
            own_ids, own_mask = pad_right([cut[i][n_shared:] for i in chunk], pad_id)
            mask = torch.cat([torch.ones(len(chunk), n_shared, dtype=torch.long), own_mask], dim=1)
            if first_layer > 0:
                past = access.expanded_cache(lower_cache, len(chunk)) if n_shared else None
                hidden.append(access.trace(own_ids, mask, block_outputs=[first_layer - 1], past=past)
                              [("block", first_layer - 1)])
            chunks.append(chunk)
            raw.append(place == 0)
            shared.append(group)
            ids.append(own_ids)
            masks.append(mask)
    return KeyPassInputs(chunks, raw, shared, shared_ids, ids, masks, hidden if first_layer > 0 else None,
                         first_layer, read_at, per)


def _rows_at(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """states[b, positions[b]] for every row b: [B, T, d], [B] → [B, d] (on the states' device)."""
    return states[torch.arange(len(positions), device=states.device), positions.to(states.device)]


@torch.no_grad()
def keys_and_outputs(
    access: ModelAccess, inputs: KeyPassInputs, key_layer: int, output_layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys at ``key_layer`` and block ``output_layer``'s output, for every request, running blocks from
    ``inputs.start`` up to ``key_layer`` on all prompts and up to ``output_layer`` on the raw prompts only.

    Returns:
        K: [d_k, n] float64, each key ½·k(raw prompt) + ½·mean of k(prefixed prompts) (docs/algorithm.md §4), or
            k(raw prompt) alone when there are no context templates;
        K_raw: [d_k, n] float64, k(raw prompt);
        H: [d_v, n] float64, block output at the subject's last token of the raw prompt.
    """
    if min(key_layer, output_layer) < inputs.start:
        raise ValueError(f"layers {key_layer}/{output_layer} lie below the cached start block {inputs.start}")
    total = len(inputs.read_at)
    keys = torch.empty(total, access.w_out(key_layer).in_features, dtype=torch.float64)
    outs = torch.empty(total, access.w_out(output_layer).out_features, dtype=torch.float64)
    # The shared tokens' states above the first edited block change with every layer's update: one pass per
    # group with the current weights.
    shared_caches = {g: access.shared_prefix(ids, key_layer)[0] for g, ids in enumerate(inputs.shared_ids)}
    for c, chunk in enumerate(inputs.chunks):
        group = inputs.shared[c]
        past = access.expanded_cache(shared_caches[group], len(chunk)) if group >= 0 else None
        block_outputs = [output_layer] if inputs.raw[c] else []
        with access.replay_from(inputs.start - 1, inputs.hidden[c]) if inputs.hidden is not None \
                else contextlib.nullcontext():
            got = access.trace(inputs.ids[c], inputs.masks[c], block_outputs=block_outputs, mlp_inputs=[key_layer],
                               past=past)
        pos = inputs.read_at[chunk]
        keys[chunk] = _rows_at(got[("key", key_layer)], pos).double().cpu()
        if inputs.raw[c]:
            outs[chunk] = _rows_at(got[("block", output_layer)], pos).double().cpu()
    per = inputs.per_request
    keys = keys.view(total // per, per, -1)
    k = keys[:, 0] if per == 1 else 0.5 * keys[:, 0] + 0.5 * keys[:, 1:].mean(1)
    return k.T.contiguous(), keys[:, 0].T.contiguous(), outs.view(total // per, per, -1)[:, 0].T.contiguous()
