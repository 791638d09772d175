"""Keys K (inputs of W_out at the subject's last token) and block-L outputs H on the current model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .requests import PreparedRequest
from .tracing import ModelAccess, chunk_by_tokens, pad_right


@dataclass
class KeyPassInputs:
    """The key prompts of a batch, cut after the subject's last token and chunked, with the residual stream
    entering the first edited block.

    Keys are read at the subject's last token, so later tokens never matter (causal attention), and updates to
    edited layers cannot change anything below the first of them: blocks 0..``start``-1 run once per batch, not
    once per edited layer. The raw prompts, the only ones whose block-L output is needed, form their own chunks,
    so the prefixed prompts stop at the key layer.
    """

    chunks: list[list[int]]  # prompt indices per forward pass
    raw: list[bool]  # whether a chunk holds raw prompts (run up to block L) or prefixed ones
    ids: list[torch.Tensor]  # per chunk [B, T], right-padded
    masks: list[torch.Tensor]  # per chunk [B, T]
    hidden: list[torch.Tensor] | None  # per chunk [B, T, d]: output of block start-1; None when start == 0
    start: int
    subject_last: torch.Tensor  # [P] position read in each prompt
    per_request: int  # prompts per request: the raw prompt first, then the prefixed ones


@torch.no_grad()
def key_pass_inputs(
    access: ModelAccess, prepared: list[PreparedRequest], first_layer: int, pad_id: int, max_tokens: int
) -> KeyPassInputs:
    """Cut and chunk the key prompts and run them once through the blocks below ``first_layer``."""
    prompts = [p for req in prepared for p in req.prompts]
    per = len(prepared[0].prompts)
    cut = [p.ids[: p.subject_last + 1] for p in prompts]
    chunks, raw = [], []
    for group, is_raw in (([i for i in range(len(cut)) if i % per == 0], True),
                          ([i for i in range(len(cut)) if i % per != 0], False)):
        for chunk in chunk_by_tokens([len(cut[i]) for i in group], max_tokens):
            chunks.append([group[j] for j in chunk])
            raw.append(is_raw)
    padded = [pad_right([cut[i] for i in chunk], pad_id) for chunk in chunks]
    hidden = None
    if first_layer > 0:
        hidden = [access.trace(ids, mask, block_outputs=[first_layer - 1])[("block", first_layer - 1)]
                  for ids, mask in padded]
    return KeyPassInputs(
        chunks, raw, [ids for ids, _ in padded], [mask for _, mask in padded], hidden, first_layer,
        torch.tensor([p.subject_last for p in prompts]), per)


@torch.no_grad()
def keys_and_outputs(
    access: ModelAccess, inputs: KeyPassInputs, key_layer: int, output_layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys at ``key_layer`` and block ``output_layer``'s output, for every request, running blocks from
    ``inputs.start`` up to ``key_layer`` on all prompts and up to ``output_layer`` on the raw prompts only.

    Returns:
        K: [d_k, n] float64, each key ½·k(raw prompt) + ½·mean of k(prefixed prompts) (ALGORITHM.md §4);
        K_raw: [d_k, n] float64, k(raw prompt);
        H: [d_v, n] float64, block output at the subject's last token of the raw prompt.
    """
    if min(key_layer, output_layer) < inputs.start:
        raise ValueError(f"layers {key_layer}/{output_layer} lie below the cached start block {inputs.start}")
    total = len(inputs.subject_last)
    keys = torch.empty(total, access.w_out(key_layer).in_features, dtype=torch.float64)
    outs = torch.empty(total, access.w_out(output_layer).out_features, dtype=torch.float64)
    for c, chunk in enumerate(inputs.chunks):
        ids, mask = inputs.ids[c], inputs.masks[c]
        block_outputs = [output_layer] if inputs.raw[c] else []
        with access.replay_from(inputs.start - 1, inputs.hidden[c]) if inputs.hidden is not None \
                else contextlib.nullcontext():
            got = access.trace(ids, mask, block_outputs=block_outputs, mlp_inputs=[key_layer])
        rows, pos = torch.arange(len(chunk), device=access.device), inputs.subject_last[chunk].to(access.device)
        keys[chunk] = got[("key", key_layer)][rows, pos].double().cpu()
        if inputs.raw[c]:
            outs[chunk] = got[("block", output_layer)][rows, pos].double().cpu()
    per = inputs.per_request
    keys = keys.view(total // per, per, -1)
    k = keys[:, 0] if per == 1 else 0.5 * keys[:, 0] + 0.5 * keys[:, 1:].mean(1)
    return k.T.contiguous(), keys[:, 0].T.contiguous(), outs.view(total // per, per, -1)[:, 0].T.contiguous()
