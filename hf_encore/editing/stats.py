"""Second-moment statistics C₀ = (1/N) Σ k kᵀ of W_out's inputs over generic text (docs/algorithm.md §5).

All edited layers are collected in one pass that stops after the deepest of them (each batch's k kᵀ in float32,
the running sum in float64), and cached on disk (float32 safetensors) under a key made of the model fingerprint,
the layer and W_out's module name, the corpus, the token count and the sequence length, so statistics for another
model, layer or corpus are never picked up by mistake. Which C₀ an edit uses is decided in ``stats_cache.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..placement import input_device
from .tracing import ModelAccess, pad_right

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class DatasetCorpus:
    """A dataset named as ``datasets.load_dataset`` takes it (``"wikitext"``, ``"wikitext-103-raw-v1"``,
    ``"train"``), read as a stream: only the texts the token budget needs are downloaded and tokenised."""

    name: str
    config: str | None = None
    split: str = "train"
    text_column: str = "text"


Corpus = Union[None, str, os.PathLike, Sequence[str], DatasetCorpus, "datasets.Dataset",  # noqa: F821
               "datasets.IterableDataset"]  # noqa: F821


@dataclass(frozen=True)
class CorpusTexts:
    texts: list[str]
    corpus_id: str  # content hash: the same texts give the same id wherever they come from
    description: str


def _content_id(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _is_stream(corpus: object) -> bool:
    return type(corpus).__name__ == "IterableDataset"


def _streamed_texts(rows: Iterable, column: str, tokenizer, n_tokens: int) -> list[str]:
    """Texts from ``rows`` (mappings) in order, until their tokens reach ``n_tokens``: the rest is never read."""
    if tokenizer is None or n_tokens is None:
        raise ValueError("a streaming statistics corpus is read up to the token budget: it needs the tokenizer")
    texts, counted = [], 0
    for row in rows:
        if column not in row:
            raise ValueError(f"the statistics dataset needs a {column!r} column, has {sorted(row)}")
        text = row[column]
        if text and text.strip():
            texts.append(text.strip())
            counted += len(tokenizer(text.strip())["input_ids"])
            if counted >= n_tokens:
                break
    return texts


def read_corpus(corpus: Corpus, tokenizer=None, n_tokens: int | None = None) -> CorpusTexts:
    """Texts from a file or directory of ``.txt`` files (one paragraph per non-empty line), a list of strings, a
    ``datasets`` dataset with a ``text`` column, or — read only as far as ``n_tokens`` tokens of ``tokenizer`` — a
    streaming ``datasets.IterableDataset`` or a :class:`DatasetCorpus` (loaded with ``streaming=True``)."""
    if isinstance(corpus, DatasetCorpus):
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise ImportError("a statistics corpus named as a dataset needs the datasets package "
                              "(pip install 'hf_encore[datasets]')") from err
        stream = load_dataset(corpus.name, corpus.config, split=corpus.split, streaming=True)
        texts = _streamed_texts(stream, corpus.text_column, tokenizer, n_tokens)
        description = f"dataset {corpus.name} ({corpus.config or 'default'}, {corpus.split}), first {len(texts)} texts"
    elif _is_stream(corpus):
        texts = _streamed_texts(corpus, "text", tokenizer, n_tokens)
        name = getattr(getattr(corpus, "info", None), "dataset_name", None) or "streaming dataset"
        description = f"{name}, first {len(texts)} texts"
    elif isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus)
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"statistics corpus not found: {path}")
        from ..data import read_user_text  # UTF-8 with or without a BOM, else an error naming the file

        texts = [line.strip() for f in files for line in read_user_text(f).splitlines()]
        # WikiText headings (" = Title = ") are not running text.
        texts = [t for t in texts if t and not (t.startswith("=") and t.endswith("="))]
        description = ", ".join(f.name for f in files)
    elif hasattr(corpus, "column_names"):
        if "text" not in corpus.column_names:
            raise ValueError(f"the statistics dataset needs a 'text' column, has {corpus.column_names}")
        texts = [t for t in corpus["text"] if t and t.strip()]
        description = f"dataset {getattr(corpus, 'info', None) and corpus.info.dataset_name}"
    elif isinstance(corpus, Sequence) and all(isinstance(t, str) for t in corpus):
        texts = [t for t in corpus if t.strip()]
        description = f"{len(texts)} texts"
    else:
        raise TypeError(f"unsupported statistics corpus: {type(corpus).__name__}")
    if not texts:
        raise ValueError("the statistics corpus holds no text")
    return CorpusTexts(texts, _content_id(texts), description)


@torch.no_grad()
def generated_corpus(lm, tokenizer, n_tokens: int, seed: int = 0, batch: int = 16, length: int = 128) -> CorpusTexts:
    """Model-generated text, for when the user gives no corpus (sampled, seeded)."""
    logger.warning("No statistics corpus given: generating %d tokens of text with the model itself for C₀. "
                   "Pass a corpus of real text (e.g. Wikipedia) for better statistics.", n_tokens)
    device = input_device(lm)
    starts = ["The", "In", "A", "It", "This", "When", "He", "She", "After", "According to", "One", "There"]
    texts: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=n_tokens, desc="generating text for C₀", leave=False)
    produced = 0
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # sampling runs on the lm_head's GPU
        torch.manual_seed(seed)
        while produced < n_tokens:
            for start in starts[: batch]:
                enc = tokenizer(start, return_tensors="pt").to(device)
                out = lm.generate(**enc, do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
                                  max_new_tokens=length, pad_token_id=pad)
                texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
                produced += out.shape[1]
                bar.update(out.shape[1])
                if produced >= n_tokens:
                    break
    bar.close()
    return CorpusTexts(texts, f"generated-{seed}-{n_tokens}", "model-generated text")


def packed_chunks(tokenizer, texts: Iterable[str], n_tokens: int, seq_len: int) -> list[list[int]]:
    """Tokenise texts in order and cut them into sequences of at most ``seq_len`` tokens, ``n_tokens`` in all."""
    chunks: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), seq_len):
            piece = ids[start: start + seq_len][: n_tokens - total]
            if len(piece) < 2:
                continue
            chunks.append(piece)
            total += len(piece)
            if total >= n_tokens:
                return chunks
    if total < n_tokens:
        logger.warning("The statistics corpus has only %d tokens (%d asked for)", total, n_tokens)
    return chunks


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
        sums[layer] = reduced.cpu() if reduced is not sums[layer] else reduced
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
