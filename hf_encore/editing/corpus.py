"""The generic text C₀ is measured on (docs/algorithm.md §5): files, lists of strings, ``datasets`` datasets,
streaming datasets and datasets named for ``load_dataset`` (read only as far as the token budget), or text the
model generates when none is given; and its packing into token sequences."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..placement import input_device

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


# The fields a fact record names its true object under, in the order looked for: the library's own and
# CounterFact's (EasyEdit schema), then a plain "target".
TRUE_OBJECT_FIELDS = ("target_true", "ground_truth", "target")


def fact_statements(facts: Iterable[Mapping[str, Any]], per_text: int = 8) -> list[str]:
    """Short factual sentences for C₀, ``per_text`` to a text: each fact's prompt with its subject filled in,
    followed by the true object ("Toko Yasuda, the guitar."), and its ``rephrase_prompt`` (a full sentence, as in
    CounterFact) followed by the same object where there is one.

    A fact is a mapping with ``prompt`` (holding ``{}`` for the subject, or the subject itself), ``subject`` and
    the true object under one of :data:`TRUE_OBJECT_FIELDS`: CounterFact cases as
    :func:`hf_encore.data.load_counterfact` returns them, or the facts a user wants kept. Why: generic text rarely
    holds the keys of short subject-led statements, which are what a fact's lookup reads, so C₀ from generic text
    alone protects them poorly (docs/results.md, "Degradation ablation"); mix them with generic text by
    :func:`interleave_texts`.
    """
    if per_text < 1:
        raise ValueError(f"per_text must be at least 1, got {per_text}")
    statements = []
    for i, fact in enumerate(facts):
        if not isinstance(fact, Mapping):
            raise TypeError(f"fact {i}: expected a mapping with prompt, subject and a true object, "
                            f"got {type(fact).__name__}")
        prompt, subject = fact.get("prompt"), fact.get("subject")
        true_object = next((fact[k] for k in TRUE_OBJECT_FIELDS if isinstance(fact.get(k), str)), None)
        if not isinstance(prompt, str) or not isinstance(subject, str) or true_object is None:
            raise ValueError(f"fact {i}: needs string fields prompt, subject and one of "
                             f"{', '.join(TRUE_OBJECT_FIELDS)}; has {sorted(fact)}")
        if "{}" not in prompt and subject not in prompt:
            raise ValueError(f"fact {i}: its prompt holds neither '{{}}' nor the subject {subject!r}")
        statements.append(f"{prompt.replace('{}', subject, 1).strip()} {true_object.strip()}.")
        if isinstance(fact.get("rephrase_prompt"), str) and fact["rephrase_prompt"].strip():
            statements.append(f"{fact['rephrase_prompt'].strip()} {true_object.strip()}.")
    return [" ".join(statements[i:i + per_text]) for i in range(0, len(statements), per_text)]


def interleave_texts(*sources: Sequence[str]) -> list[str]:
    """The texts of every source, each source's in its own order, the source with the fewest characters so far
    next (ties to the earlier source): any prefix — which is what a token budget reads (:func:`packed_chunks`) —
    holds about equal shares of each source, until the shorter ones run out.

    ``interleave_texts(fact_statements(facts), read_corpus("wiki.txt").texts)`` is a C₀ corpus half factual
    statements, half generic text, to pass as ``corpus=``.
    """
    queues = [[t for t in source if t.strip()] for source in sources]
    positions = [0] * len(queues)
    sizes = [0] * len(queues)
    texts: list[str] = []
    while True:
        open_sources = [i for i, queue in enumerate(queues) if positions[i] < len(queue)]
        if not open_sources:
            return texts
        i = min(open_sources, key=lambda j: (sizes[j], j))
        text = queues[i][positions[i]]
        positions[i] += 1
        sizes[i] += len(text)
        texts.append(text)


# Bumped whenever generated_corpus would produce other text for the same seed and size, so that statistics cached
# from an earlier generator are not taken for this one's.
GENERATOR_VERSION = 2


def generated_corpus_id(seed: int, n_tokens: int) -> str:
    """The corpus id of :func:`generated_corpus`'s text (known before any text is generated: the cache key)."""
    return f"generated-v{GENERATOR_VERSION}-{seed}-{n_tokens}"


@torch.no_grad()
def generated_corpus(lm, tokenizer, n_tokens: int, seed: int = 0, batch: int = 64,
                     length: int = 128) -> CorpusTexts:
    """Model-generated text, for when the user gives no corpus: ``batch`` sequences of up to ``length`` new tokens
    sampled at once (seeded), each from one of a few common sentence openings, until ``n_tokens`` tokens.

    One sequence at a time leaves the hardware idle (on a 2-core CPU SmolLM2 sampled 9–20 tokens/s); a batch of 64
    sampled 87 tokens/s there, which is close to the cost of the forward passes themselves, and on a GPU a batch
    costs about what one sequence does.
    """
    logger.warning("No statistics corpus given: generating %d tokens of text with the model itself for C₀. "
                   "Pass a corpus of real text (e.g. Wikipedia) for better statistics.", n_tokens)
    device = input_device(lm)
    starts = [tokenizer(text)["input_ids"] for text in
              ("The", "In", "A", "It", "This", "When", "He", "She", "After", "According to", "One", "There")]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    produced = 0
    bar = tqdm(total=n_tokens, desc="generating text for C₀", leave=False)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # sampling runs on the lm_head's GPU
        torch.manual_seed(seed)
        while produced < n_tokens:
            # The last batch holds only the sequences the budget still needs (up to one more round if some end early).
            rows = min(batch, -(-(n_tokens - produced) // length))
            prompts = [starts[(len(texts) + i) % len(starts)] for i in range(rows)]
            width = max(map(len, prompts))
            # Left-padded by hand (the caller's tokenizer keeps its padding side): generation continues at the end.
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            out = lm.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=50,
                              top_p=1.0, temperature=1.0, max_new_tokens=length, pad_token_id=pad)
            for prompt, row in zip(prompts, out[:, width:].tolist()):
                # A sequence that ended is padded after its end.
                if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                texts.append(tokenizer.decode(prompt + row, skip_special_tokens=True))
                produced += len(prompt) + len(row)
                bar.update(len(prompt) + len(row))
    bar.close()
    return CorpusTexts(texts, generated_corpus_id(seed, n_tokens), "model-generated text")


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
