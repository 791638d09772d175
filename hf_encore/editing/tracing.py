"""Reading and steering a transformers causal LM: activations at given layers, logits at given positions, and
re-running only the blocks above a layer from cached activations.

Everything model-specific comes from :class:`~hf_encore.architectures.ModelLayout`; the rest uses transformers'
generic entry points (``base_model``, ``get_output_embeddings``), so one code path serves every family.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from ..architectures import ModelLayout, get_blocks


class _StopForward(Exception):
    """Raised from a hook once everything asked for is captured, so deeper layers are never computed."""


def _first(output):
    # Decoder blocks return a tensor in transformers 5 and a tuple in older releases.
    return output[0] if isinstance(output, (tuple, list)) else output


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists. Returns ids [B, T] and attention mask [B, T] (1 on real tokens)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def chunk_by_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Split indices 0..n-1, in order, into chunks whose padded size (count × longest) stays within ``budget``."""
    chunks, current, longest = [], [], 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        if current and new_longest * (len(current) + 1) > budget:
            chunks.append(current)
            current, new_longest = [], n
        current.append(i)
        longest = new_longest
    if current:
        chunks.append(current)
    return chunks


class ModelAccess:
    """The pieces of a causal LM that editing reads and steers."""

    def __init__(self, lm: nn.Module, layout: ModelLayout) -> None:
        self.lm = lm
        self.layout = layout
        self.blocks = get_blocks(lm, layout)
        self.decoder = lm.base_model
        self.unembedding = lm.get_output_embeddings()
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    @property
    def device(self) -> torch.device:
        return self.unembedding.weight.device

    def w_out(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.layout.mlp_out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] from final hidden states [..., d] (after the model's final norm)."""
        weight = self.unembedding.weight
        logits = nn.functional.linear(hidden.to(weight.dtype), weight, getattr(self.unembedding, "bias", None))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def trace(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        block_outputs: Sequence[int] = (),
        mlp_inputs: Sequence[int] = (),
    ) -> dict[tuple[str, int], torch.Tensor]:
        """Run the model just far enough to capture the outputs of some blocks and the inputs of some W_out.

        Returns ``{("block", l): [B, T, d_v], ("key", l): [B, T, d_k]}``.
        """
        captured: dict[tuple[str, int], torch.Tensor] = {}
        wanted = len(set(block_outputs)) + len(set(mlp_inputs))

        def store(key, value):
            captured[key] = value
            if len(captured) == wanted:
                raise _StopForward

        handles = []
        try:
            for layer in set(block_outputs):
                handles.append(self.blocks[layer].register_forward_hook(
                    lambda m, a, out, layer=layer: store(("block", layer), _first(out))))
            for layer in set(mlp_inputs):
                handles.append(self.w_out(layer).register_forward_pre_hook(
                    lambda m, args, layer=layer: store(("key", layer), args[0])))
            with contextlib.suppress(_StopForward):
                self.decoder(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                             use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return captured

    @contextlib.contextmanager
    def replay_from(self, layer: int, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward pass skips blocks 0..``layer`` and starts from ``hidden`` [B, T, d] as the
        output of block ``layer``: activations below the critical layer are computed once, not at every step."""
        patched = list(self.blocks[: layer + 1])

        def passthrough(hidden_states, *args, **kwargs):
            return hidden_states

        def replay(hidden_states, *args, **kwargs):
            return hidden

        try:
            for block in patched[:-1]:
                block.forward = passthrough
            patched[-1].forward = replay
            yield
        finally:
            for block in patched:
                block.__dict__.pop("forward", None)

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, d] (after the final norm)."""
        out = self.decoder(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                           use_cache=False)
        return out.last_hidden_state
