"""Reading and steering a transformers causal LM: activations at given layers, logits at given positions, and
re-running only the blocks above a layer from cached activations.

Everything model-specific comes from :class:`~hf_encore.architectures.ModelLayout`; the rest uses transformers'
generic entry points (``base_model``, ``get_output_embeddings``), so one code path serves every family.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..architectures import MODEL_LAYOUTS, ModelLayout, get_blocks
from ..placement import compute_dtype, execution_device, input_device, onloaded


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


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Number of leading tokens every sequence shares."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def own_tail_shared_length(seqs: Sequence[Sequence[int]]) -> int:
    """Number of leading tokens every sequence shares, leaving each at least its last token of its own (the one a
    continuation is read at)."""
    return max(0, min(common_prefix_length(seqs), min(len(s) for s in seqs) - 1))


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


@dataclass
class PrefixStates:
    """What a δ added at position ``split_s`` of sequence s cannot change, computed once: block L's output at every
    position, and the keys/values of every block above L at the positions before ``split_s``.

    Attention keys/values are stored right-aligned in a block of ``width`` positions, so a batch of any sequences
    is one gather per layer, left-padded as attention with a cache expects.
    """

    block_output: list[torch.Tensor]  # per sequence [len_s, d], on the model's device
    split: torch.Tensor  # [S] number of positions before the one that δ changes
    keys: dict[int, torch.Tensor]  # per layer above L: [S, kv_heads, width, head_dim]
    values: dict[int, torch.Tensor]
    width: int


def cache_kwarg(model: nn.Module) -> str:
    """The name a model's forward takes its cache under: transformers 5 renames ``past_key_values`` to ``cache``
    (the old name goes in 5.40). Wrappers (PEFT) are looked through to the model they wrap."""
    inner = causal_lm(model)
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT wrapper (its target layers wrapped in place), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class LogitMap:
    """What a family does to the unembedding's output: logits = softcap·tanh(scale·z / softcap), either part absent
    where ``None`` (Cohere scales, Gemma-2/3 cap)."""

    scale: float | None = None
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def slope(self, logits: torch.Tensor) -> torch.Tensor | float:
        """d logits / d z, read back from the mapped logits: scale·(1 − tanh²) (a number without a softcap)."""
        slope = 1 - (logits / self.softcap) ** 2 if self.softcap else 1.0
        return slope * self.scale if self.scale is not None else slope


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, LogitMap]:
    """A causal LM's (or a PEFT model's) decoder — its ``last_hidden_state`` is after the final norm —, its
    unembedding and what the family does to the unembedding's output (its layout row's ``logit_scale``, the
    config's ``final_logit_softcapping``)."""
    lm = causal_lm(model)
    config = lm.config
    row = MODEL_LAYOUTS.get(getattr(config, "model_type", None))
    scale = getattr(config, row.logit_scale) if row is not None and row.logit_scale else None
    logit_map = LogitMap(None if scale is None else float(scale), getattr(config, "final_logit_softcapping", None))
    return lm.base_model, lm.get_output_embeddings(), logit_map


MAX_LOGITS = 1 << 25  # logit values one unembedding chunk may hold (128 MiB in float32)


def unembed(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            logit_map: LogitMap) -> torch.Tensor:
    """Float32 logits [..., V] from final hidden states [..., d] (after the model's final norm), mapped as the
    model maps them (:class:`LogitMap`)."""
    return logit_map(nn.functional.linear(hidden.to(weight.dtype), weight, bias)).float()


class _TokenLogProb(torch.autograd.Function):
    """log p(label | h) per row, and the argmax. Its gradient in h is a [d] vector per row — Wᵀ(e_label − softmax),
    times the logit map's slope — so the forward pass computes it chunk by chunk and keeps only that [m, d]
    Jacobian: the backward pass scales it by the incoming per-row gradient. No [m, V] tensor outlives its chunk
    (autograd's log_softmax would keep one for the backward pass: 2 GB for 2,000 target tokens of Gemma's 262k
    vocabulary), and the FLOPs are those of the forward and backward matmuls as before."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, logit_map, rows):
        m = hidden.shape[0]
        log_p = torch.empty(m, dtype=torch.float32, device=hidden.device)
        argmax = torch.empty(m, dtype=torch.long, device=hidden.device)
        jacobian = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, m, rows):
            end = min(m, start + rows)
            label = labels[start:end, None]
            logits = unembed(hidden[start:end], weight, bias, logit_map)  # [rows, V]
            lse = logits.logsumexp(-1, keepdim=True)
            log_p[start:end] = (logits.gather(1, label) - lse).squeeze(1)
            argmax[start:end] = logits.argmax(-1)
            if jacobian is not None:
                slope = logit_map.slope(logits)
                grad = logits.sub_(lse).exp_().neg_().scatter_add_(1, label, torch.ones_like(label, dtype=logits.dtype))
                if not isinstance(slope, float) or slope != 1.0:
                    grad.mul_(slope)
                jacobian[start:end] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.mark_non_differentiable(argmax)
        ctx.save_for_backward(jacobian)
        return log_p, argmax

    @staticmethod
    def backward(ctx, grad_log_p, grad_argmax):
        (jacobian,) = ctx.saved_tensors
        return grad_log_p[:, None].to(jacobian.dtype) * jacobian, None, None, None, None, None


def token_log_probs(hidden: torch.Tensor, labels: torch.Tensor, unembedding: nn.Module, logit_map: LogitMap,
                    max_logits: int = MAX_LOGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) [m] (float32, differentiable in ``hidden``) and the argmax token [m] at final hidden states
    ``hidden`` [m, d] (after the final norm), without holding an [m, V] tensor: rows go through the unembedding
    in chunks of at most ``max_logits`` logits. Computed where the unembedding runs (an offloaded one is loaded for
    the call) and returned on ``hidden``'s device."""
    with onloaded(unembedding):
        weight = unembedding.weight
        rows = max(1, max_logits // weight.shape[0])
        log_p, argmax = _TokenLogProb.apply(hidden.to(weight.device), weight.detach(),
                                            getattr(unembedding, "bias", None), labels.to(weight.device), logit_map,
                                            rows)
    return log_p.to(hidden.device), argmax.to(hidden.device)


class ModelAccess:
    """The pieces of a causal LM that editing reads and steers, and where each runs.

    Devices and dtypes are decided here (through ``placement.py``), for models on one device and models dispatched
    by accelerate alike: token ids and masks go to the input embeddings' device (``input_device``); a hidden state
    fed into block l is cast to the model's dtype (``dtype``) on that block's execution device
    (:meth:`block_device`); logits are computed where the unembedding runs and returned in float32 beside the hidden
    states they came from. Callers keep their own float32/float64 tensors (z, keys, sums) where the block that
    produced them runs.
    """

    def __init__(self, lm: nn.Module, layout: ModelLayout) -> None:
        self.lm = lm
        self.layout = layout
        self.blocks = get_blocks(lm, layout)
        self.decoder, self.unembedding, self.logit_map = lm_parts(lm)
        self.cache_kwarg = cache_kwarg(self.decoder)
        self.dtype = compute_dtype(self.decoder)
        self.input_device = input_device(self.decoder)

    def block_device(self, layer: int) -> torch.device:
        """Where block ``layer`` executes."""
        return execution_device(self.blocks[layer])

    def moments_device(self, layer: int, where: str) -> torch.device:
        """Where C₀ and S_prev of edited layer ``layer`` are held and its update solved (``EncoreConfig.
        moments_device``): the host, or where the layer executes."""
        return self.block_device(layer) if where == "layer" else torch.device("cpu")

    def w_out(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.layout.mlp_out)

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm applied to the MLP output before the residual add (Gemma-2/3), or ``None``."""
        return self.blocks[layer].get_submodule(self.layout.post_mlp_norm) if self.layout.post_mlp_norm else None

    @torch.no_grad()
    def mlp_output_through_norm(
        self, layer: int, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For keys K [d_k, n]: W_out's output m = W_out(K) [d_v, n], the post-MLP norm's output N(m) [d_v, n] and its
        per-channel gain N(1) [d_v], all float64. Requires a layout with a post-MLP norm."""
        norm = self.post_mlp_norm(layer)
        w_out = self.w_out(layer)
        m = w_out(keys.T.to(device=self.block_device(layer), dtype=self.dtype))
        ones = torch.ones(1, m.shape[1], device=m.device, dtype=m.dtype)
        return m.double().T.cpu(), norm(m).double().T.cpu(), norm(ones)[0].double().cpu()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., V] from final hidden states [..., d] (after the model's final norm), on
        ``hidden``'s device."""
        with onloaded(self.unembedding) as unembedding:
            weight = unembedding.weight
            logits = unembed(hidden.to(weight.device), weight, getattr(unembedding, "bias", None), self.logit_map)
        return logits.to(hidden.device)

    def token_log_probs(self, hidden: torch.Tensor, labels: torch.Tensor,
                        max_logits: int = MAX_LOGITS) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`token_log_probs` through this model's unembedding and logit map, on ``hidden``'s device (and
        differentiable in it)."""
        return token_log_probs(hidden, labels, self.unembedding, self.logit_map, max_logits)

    def trace(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        block_outputs: Sequence[int] = (),
        mlp_inputs: Sequence[int] = (),
        past=None,
    ) -> dict[tuple[str, int], torch.Tensor]:
        """Run the model just far enough to capture the outputs of some blocks and the inputs of some W_out.

        ``past``: a cache holding the first P positions of every row (see :meth:`expanded_cache`); ``input_ids``
        [B, T] then continue them and ``attention_mask`` is [B, P + T].
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
            # OPT feeds its MLP the [B·T, d] flattened hidden states: keys are put back as [B, T, d_k].
            sequence = tuple(input_ids.shape)
            for layer in set(mlp_inputs):
                handles.append(self.w_out(layer).register_forward_pre_hook(
                    lambda m, args, layer=layer: store(("key", layer), args[0].reshape(*sequence, -1))))
            with contextlib.suppress(_StopForward):
                self.decoder(input_ids=input_ids.to(self.input_device),
                             attention_mask=attention_mask.to(self.input_device),
                             **self._continuation(past, input_ids.shape[1]))
        finally:
            for h in handles:
                h.remove()
        return captured

    @contextlib.contextmanager
    def replay_from(self, layer: int, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward pass skips blocks 0..``layer`` and starts from ``hidden`` [B, T, d] as the
        output of block ``layer`` (cast to the model's dtype on that block's device; differentiable): activations
        below the critical layer are computed once, not at every step.

        The skipped blocks' ``forward`` is replaced for the duration, and whatever the instance had there before
        (accelerate's hook wrapper on a dispatched model) is put back."""
        patched = list(self.blocks[: layer + 1])
        hidden = hidden.to(device=self.block_device(layer), dtype=self.dtype)
        missing = object()
        own_forward = [block.__dict__.get("forward", missing) for block in patched]
        # The stand-ins return what the blocks return: a tensor, or a tuple led by it (Falcon).
        wrap = (lambda h: (h,)) if self.blocks_return_tuples else (lambda h: h)

        def passthrough(hidden_states, *args, **kwargs):
            return wrap(hidden_states)

        def replay(hidden_states, *args, **kwargs):
            return wrap(hidden)

        try:
            for block in patched[:-1]:
                block.forward = passthrough
            patched[-1].forward = replay
            yield
        finally:
            for block, forward in zip(patched, own_forward):
                if forward is missing:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = forward

    @functools.cached_property
    def blocks_return_tuples(self) -> bool:
        """Whether a decoder block returns a tuple (hidden states, …) rather than the hidden states: most
        transformers 5 families return the tensor, a few (Falcon) still the tuple, and the decoder indexes it.
        Read once from block 0 on a one-token pass that stops there."""
        seen = []

        def look(module, args, output):
            seen.append(isinstance(output, (tuple, list)))
            raise _StopForward

        handle = self.blocks[0].register_forward_hook(look)
        try:
            with torch.no_grad(), contextlib.suppress(_StopForward):
                self.decoder(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.input_device),
                             use_cache=False)
        finally:
            handle.remove()
        return seen[0]

    def _continuation(self, past, length: int) -> dict:
        """Forward arguments for ``length`` new positions after those held in ``past`` (none: a fresh pass)."""
        if past is None:
            return {"use_cache": False}
        start = past.get_seq_length()
        positions = torch.arange(start, start + length, device=self.input_device)
        return {"use_cache": True, self.cache_kwarg: past, "cache_position": positions,
                "position_ids": positions.unsqueeze(0)}

    def expanded_cache(self, cache, rows: int):
        """A new cache holding ``cache``'s positions (batch 1) for each of ``rows`` rows; ``cache`` is untouched.
        Layers ``cache`` never reached stay empty."""
        from transformers import DynamicCache

        data = [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                if layer.is_initialized else (None, None) for layer in cache.layers]
        return DynamicCache(ddp_cache_data=data, config=self.lm.config)

    @torch.no_grad()
    def shared_prefix(self, ids: Sequence[int], through_layer: int, output_layer: int | None = None):
        """One pass (batch 1) of tokens that many sequences start with, through blocks 0..``through_layer``:
        (their cache, block ``output_layer``'s output [P, d] or ``None``)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        outputs = [through_layer] if output_layer is None else [through_layer, output_layer]
        got = self.trace(torch.tensor([list(ids)]), torch.ones(1, len(ids), dtype=torch.long),
                         block_outputs=outputs, past=cache)
        return cache, None if output_layer is None else got[("block", output_layer)][0].float()

    @torch.no_grad()
    def prefix_states(self, ids: Sequence[Sequence[int]], split: Sequence[int], layer: int, pad_id: int,
                      max_tokens: int, shared_groups: Sequence[Sequence[int]] = ()) -> PrefixStates:
        """Run every sequence once and keep what replaying it from block ``layer`` with a change at position
        ``split[s]`` needs: blocks up to ``layer`` on all positions, the blocks above only on the positions before
        the split (keys/values before position t depend on tokens before t only).

        ``shared_groups``: groups of sequences likely to start alike (the same context template). The tokens a
        group has in common, up to its earliest split, run once for the whole group; its sequences continue from
        that pass's cache. Results are the same (to float rounding) with or without groups.
        """
        split_t = torch.tensor(list(split), dtype=torch.long)
        if (split_t < 0).any() or any(sp >= len(s) for sp, s in zip(split, ids)):
            raise ValueError("every split must fall inside its sequence")
        window = getattr(self.lm.config.get_text_config(decoder=True), "sliding_window", None)
        longest = max(len(s) for s in ids)
        if window and longest >= window:
            raise ValueError(f"an editing prompt of {longest} tokens exceeds the model's sliding window ({window})")
        width = int(split_t.max())
        block_output: list[torch.Tensor] = [None] * len(ids)  # type: ignore[list-item]
        keys: dict[int, torch.Tensor] = {}
        values: dict[int, torch.Tensor] = {}
        plans: list[tuple[list[int], int]] = []  # (sequences, positions they share)
        grouped: set[int] = set()
        for group in shared_groups:
            group = [s for s in group if s not in grouped]
            n_shared = min(common_prefix_length([ids[s] for s in group]), min(split[s] for s in group)) if group else 0
            if len(group) > 1 and n_shared > 0:
                plans.append((group, n_shared))
                grouped.update(group)
        plans.append(([s for s in range(len(ids)) if s not in grouped], 0))
        for seqs, n_shared in plans:
            shared_cache, shared_hidden = self.shared_prefix(ids[seqs[0]][:n_shared], len(self.blocks) - 1, layer) \
                if n_shared else (None, None)
            for chunk_pos in chunk_by_tokens([len(ids[s]) - n_shared for s in seqs], max_tokens):
                chunk = [seqs[i] for i in chunk_pos]
                self._prefix_chunk(ids, split_t, chunk, layer, pad_id, width, n_shared, shared_cache, shared_hidden,
                                   block_output, keys, values)
        return PrefixStates(block_output, split_t, keys, values, width)

    def _prefix_chunk(self, ids, split_t, chunk, layer, pad_id, width, n_shared, shared_cache, shared_hidden,
                      block_output, keys, values) -> None:
        """:meth:`prefix_states` for the sequences ``chunk``, which share their first ``n_shared`` positions (held
        in ``shared_cache``, with block ``layer``'s output there ``shared_hidden`` [n_shared, d])."""
        from transformers import DynamicCache

        upper = range(layer + 1, len(self.blocks))
        batch_ids, mask = pad_right([ids[i][n_shared:] for i in chunk], pad_id)  # the positions of their own
        full_mask = torch.cat([torch.ones(len(chunk), n_shared, dtype=torch.long), mask], dim=1)
        past = self.expanded_cache(shared_cache, len(chunk)) if n_shared else None
        hidden = self.trace(batch_ids, full_mask, block_outputs=[layer], past=past)[("block", layer)]
        for row, i in enumerate(chunk):
            own = hidden[row, : len(ids[i]) - n_shared].float()
            block_output[i] = torch.cat([shared_hidden, own]) if n_shared else own
        n_of_row = split_t[chunk]  # [B] positions before the split, shared ones included
        if not upper or int(n_of_row.max()) == 0:
            return
        n_max = int(n_of_row.max()) - n_shared  # positions of their own before the split
        # A second copy of the shared cache: the pass above extended the first one's lower layers.
        cache = self.expanded_cache(shared_cache, len(chunk)) if n_shared else DynamicCache(config=self.lm.config)
        if n_max > 0:
            # Blocks up to ``layer`` are skipped and keep only the shared positions: the past length the attention
            # mask is built from.
            with self.replay_from(layer, hidden[:, :n_max]):
                self.decoder(input_ids=batch_ids[:, :n_max].to(self.input_device),
                             attention_mask=full_mask[:, : n_shared + n_max].to(self.input_device),
                             **self._continuation(cache, n_max))
        # Every (row, t < split) of the chunk, moved to position width − split + t: one copy per layer.
        row_of = torch.arange(len(chunk)).repeat_interleave(n_of_row)
        t_of = torch.arange(int(n_of_row.sum())) - (torch.cumsum(n_of_row, 0) - n_of_row).repeat_interleave(n_of_row)
        seq_of = torch.tensor(chunk)[row_of]
        dest = width - n_of_row[row_of] + t_of
        for block in upper:
            k, v = cache.layers[block].keys, cache.layers[block].values  # [B, kv_heads, ≥ max split, head_dim]
            row_of, t_of, seq_of, dest = (t.to(k.device) for t in (row_of, t_of, seq_of, dest))
            if block not in keys:
                shape = (len(ids), k.shape[1], width, k.shape[3])
                keys[block] = torch.zeros(shape, dtype=k.dtype, device=k.device)
                values[block] = torch.zeros(shape, dtype=v.dtype, device=v.device)
            keys[block][seq_of, :, dest] = k[row_of, :, t_of]
            values[block][seq_of, :, dest] = v[row_of, :, t_of]

    def replay_suffix(self, layer: int, prefix: PrefixStates, seqs: Sequence[int], hidden: torch.Tensor,
                      suffix_ids: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, d] of positions ``split[s]…`` of sequences ``seqs``, given block ``layer``'s
        output there (``hidden`` [B, T, d], right-padded): only the blocks above ``layer`` run, only on these
        positions, attending to the stored keys/values of the positions before."""
        from transformers import DynamicCache

        seqs_t = torch.as_tensor(list(seqs), dtype=torch.long)
        before = prefix.split[seqs_t]  # [B]
        width = int(before.max())
        rows, length = suffix_ids.shape
        data = []
        for block in range(len(self.blocks)):
            if block in prefix.keys:
                index = seqs_t.to(prefix.keys[block].device)
                data.append((prefix.keys[block][index, :, prefix.width - width:],
                             prefix.values[block][index, :, prefix.width - width:]))
            else:
                # Blocks up to ``layer`` are skipped; the cache only has to report the right length for the mask.
                stub = torch.zeros(rows, 1, width, 1, device=self.block_device(block))
                data.append((stub, stub))
        cache = DynamicCache(ddp_cache_data=data, config=self.lm.config)
        columns = torch.arange(width)
        prefix_mask = (columns.unsqueeze(0) >= (width - before).unsqueeze(1)).long()  # real tokens right-aligned
        mask = torch.cat([prefix_mask, suffix_mask.long()], dim=1)
        position_ids = before.unsqueeze(1) + torch.arange(length).unsqueeze(0)
        with self.replay_from(layer, hidden):
            out = self.decoder(input_ids=suffix_ids.to(self.input_device), attention_mask=mask.to(self.input_device),
                               position_ids=position_ids.to(self.input_device), use_cache=True,
                               cache_position=torch.arange(width, width + length, device=self.input_device),
                               **{self.cache_kwarg: cache})
        return out.last_hidden_state

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, d] (after the final norm)."""
        out = self.decoder(input_ids=input_ids.to(self.input_device),
                           attention_mask=attention_mask.to(self.input_device), use_cache=False)
        return out.last_hidden_state
