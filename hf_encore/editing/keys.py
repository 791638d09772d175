"""Keys K (inputs of W_out at the subject's last token) and block-L outputs H on the current model."""

from __future__ import annotations

import torch

from .requests import PreparedRequest
from .tracing import ModelAccess, chunk_by_tokens, pad_right


@torch.no_grad()
def keys_and_outputs(
    access: ModelAccess,
    prepared: list[PreparedRequest],
    key_layer: int,
    output_layer: int,
    pad_id: int,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at ``key_layer`` and block ``output_layer``'s output, for every request, in one pass that stops after
    the deeper of the two.

    Returns:
        K: [d_k, n] float64, each key ½·k(raw prompt) + ½·mean of k(prefixed prompts) (ALGORITHM.md §4);
        H: [d_v, n] float64, block output at the subject's last token of the raw prompt.
    """
    per = len(prepared[0].prompts)
    ids = [p.ids for req in prepared for p in req.prompts]
    lookup = torch.tensor([p.subject_last for req in prepared for p in req.prompts])
    keys = torch.empty(len(ids), access.w_out(key_layer).in_features, dtype=torch.float64)
    outs = torch.empty(len(ids), access.w_out(output_layer).out_features, dtype=torch.float64)
    for chunk in chunk_by_tokens([len(s) for s in ids], max_tokens):
        batch_ids, mask = pad_right([ids[i] for i in chunk], pad_id)
        got = access.trace(batch_ids, mask, block_outputs=[output_layer], mlp_inputs=[key_layer])
        rows, pos = torch.arange(len(chunk)), lookup[chunk]
        keys[chunk] = got[("key", key_layer)][rows, pos].double().cpu()
        outs[chunk] = got[("block", output_layer)][rows, pos].double().cpu()
    keys = keys.view(len(prepared), per, -1)
    outs = outs.view(len(prepared), per, -1)
    k = keys[:, 0] if per == 1 else 0.5 * keys[:, 0] + 0.5 * keys[:, 1:].mean(1)
    return k.T.contiguous(), outs[:, 0].T.contiguous()
