"""Second-moment statistics C₀ = (1/N) Σ k kᵀ of W_out's inputs over generic text (docs/algorithm.md §5).

All edited layers are collected in one pass that stops after the deepest of them (each batch's k kᵀ in float32,
the running sum in float64), and cached on disk (float32 safetensors) under a key made of the model fingerprint,
the layer and W_out's module name, the corpus, the token count and the sequence length, so statistics for another
model, layer or corpus are never picked up by mistake. Which C₀ an edit uses is decided in ``stats_cache.py``;
the text it is measured on comes from ``corpus.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .tracing import ModelAccess, pad_right

logger = logging.getLogger(__name__)


@torch.no_grad()
def second_moments(
    access: ModelAccess, chunks: list[list[int]], layers: Sequence[int], pad_id: int, max_tokens: int,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """C₀ per layer [d_k, d_k] (float64) over every non-pad token of ``chunks``, in one pass per batch that stops
    after the deepest layer. Returns ``({layer: C₀}, N_tokens)``.

    Under ``torch.distributed`` (``accelerate launch``, ``torchrun``) with several processes, each process reads
    every world-size-th chunk and the sums and counts are all-reduced: every process returns the C₀ of all the
    chunks, equal to one process's to float rounding."""
    sums: dict[int, torch.Tensor] = {}
    count = 0
    rank, world = _distributed()
    chunks = chunks[rank::world]
    per_batch = max(1, max_tokens // max(len(c) for c in chunks)) if chunks else 1
    bar = tqdm(total=sum(len(c) for c in chunks), desc="second-moment statistics", unit="tok",
               disable=not progress, leave=False)
    for start in range(0, len(chunks), per_batch):
        batch = chunks[start: start + per_batch]
        ids, mask = pad_right(batch, pad_id)
        got = access.trace(ids, mask, mlp_inputs=list(layers))
        for layer in layers:
            key = got[("key", layer)]  # on the device of its layer
            k = key[mask.bool().to(key.device)].float()  # [tokens, d_k]
            kk = (k.T @ k).double().cpu()
            if layer in sums:
                sums[layer].add_(kk)  # in place: at d_k = 14,336 each sum is 1.6 GB
            else:
                sums[layer] = kk
        count += int(mask.sum())
        bar.update(int(mask.sum()))
    bar.close()
    if world > 1:
        count = _all_reduce_sums(sums, layers, access, count)
    return {layer: s.div_(count) for layer, s in sums.items()}, count


def _distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed`` process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 of a ``torch.distributed`` group, or the only process."""
    return _distributed()[0] == 0


def _all_reduce_sums(sums: dict[int, torch.Tensor], layers: Sequence[int], access: ModelAccess, count: int) -> int:
    """Sum every process's Σkkᵀ (in place) and token count; returns the total count. Gloo reduces host tensors,
    NCCL device tensors: the sums travel through the device the backend needs."""
    import torch.distributed as dist

    device = access.block_device(layers[0]) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([count], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    for layer in layers:
        if layer not in sums:  # a process with no chunks contributes zeros
            d_k = access.w_out(layer).in_features
            sums[layer] = torch.zeros(d_k, d_k, dtype=torch.float64)
        reduced = sums[layer].to(device)
        dist.all_reduce(reduced)
        sums[layer] = reduced.cpu()  # the same tensor on gloo (already on the host)
    return int(total.item())


def stats_cache_key(model_fingerprint: str, layer: int, module: str, corpus_id: str, n_tokens: int,
                    seq_len: int) -> str:
    payload = json.dumps([model_fingerprint, layer, module, corpus_id, n_tokens, seq_len])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_cached(path: Path, expect: dict[str, str]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if any(meta.get(k) != v for k, v in expect.items()):
        logger.warning("Ignoring statistics file %s: it was made for %s", path, meta)
        return None
    return load_file(str(path))["c0"]  # float32, as written; held as the adapter's config says


def save_cached(path: Path, c0: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write beside and rename, so an interrupted write never leaves a file that loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"c0": c0.float().contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
