"""Where C₀ comes from at scale: a streaming dataset read only up to the token budget, a dataset named as
``datasets.load_dataset`` takes it, and several processes under ``torch.distributed`` sharing the corpus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.editing.corpus import DatasetCorpus, packed_chunks, read_corpus
from hf_encore.editing.stats import second_moments
from hf_encore.editing.tracing import ModelAccess

from tiny_models import TINY_CORPUS, TINY_EDIT, TINY_LAYERS, tiny_llama, tiny_tokenizer

datasets = pytest.importorskip("datasets", reason="the datasets extra (pip install hf_encore[datasets])")


def test_a_streaming_dataset_is_read_only_up_to_the_token_budget():
    read = []

    def rows():
        for text in TINY_CORPUS:
            read.append(text)
            yield {"text": text}

    stream = datasets.IterableDataset.from_generator(rows)
    tokenizer = tiny_tokenizer()
    got = read_corpus(stream, tokenizer, n_tokens=500)
    assert sum(len(tokenizer(t).input_ids) for t in got.texts) >= 500
    assert got.texts == TINY_CORPUS[: len(got.texts)]
    assert len(read) < len(TINY_CORPUS) // 2  # the rest of the stream was never produced
    # The same texts give the same corpus id as a list of them: the C₀ cache is shared.
    assert got.corpus_id == read_corpus(TINY_CORPUS[: len(got.texts)]).corpus_id
    with pytest.raises(ValueError, match="needs the tokenizer"):
        read_corpus(stream)


def test_statistics_from_a_stream_equal_those_from_the_list(stats_cache, tmp_path):
    config = EncoreConfig(layers=list(TINY_LAYERS), **TINY_EDIT)
    from_list = get_encore_model(tiny_llama(), config, tokenizer=tiny_tokenizer()).base_model.compute_statistics(
        TINY_CORPUS, progress=False)
    stream = datasets.Dataset.from_dict({"text": TINY_CORPUS}).to_iterable_dataset()
    fresh = get_encore_model(tiny_llama(), EncoreConfig(layers=list(TINY_LAYERS), **TINY_EDIT),
                             tokenizer=tiny_tokenizer())
    fresh.base_model.statistics.loaded.clear()
    for path in (stats_cache / "stats").glob("*"):
        path.unlink()
    from_stream = fresh.base_model.compute_statistics(stream, progress=False)
    for layer in TINY_LAYERS:
        assert from_stream[layer].n_tokens == from_list[layer].n_tokens
        assert torch.equal(from_stream[layer].c0, from_list[layer].c0)


def test_a_dataset_named_for_load_dataset_is_streamed(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(TINY_CORPUS) + "\n")
    tokenizer = tiny_tokenizer()
    got = read_corpus(DatasetCorpus(str(folder), split="train"), tokenizer, n_tokens=300)
    assert got.texts == TINY_CORPUS[: len(got.texts)] and len(got.texts) < len(TINY_CORPUS)
    assert "first" in got.description


WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from tiny_models import tiny_llama, tiny_tokenizer, TINY_CORPUS, TINY_LAYERS
from hf_encore.architectures import resolve_layout
from hf_encore.editing.corpus import packed_chunks
from hf_encore.editing.stats import second_moments
from hf_encore.editing.tracing import ModelAccess
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{rendezvous}", rank=rank, world_size=2)
torch.set_num_threads(1)
model = tiny_llama()
tokenizer = tiny_tokenizer()
chunks = packed_chunks(tokenizer, TINY_CORPUS, 3000, 64)
c0, count = second_moments(ModelAccess(model, resolve_layout(model)), chunks, TINY_LAYERS, tokenizer.pad_token_id,
                           512, progress=False)
torch.save({{"c0": c0, "count": count}}, {out!r} + f"/rank{{rank}}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow  # two fresh interpreters
def test_two_processes_share_the_corpus_and_all_reduce_the_same_c0(tmp_path):
    from hf_encore.architectures import resolve_layout

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), rendezvous=str(tmp_path / "rendezvous"),
                                    out=str(tmp_path)))
    workers = [subprocess.Popen([sys.executable, str(script), str(rank)], stderr=subprocess.PIPE, text=True)
               for rank in (0, 1)]
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert all(w.returncode == 0 for w in workers), errors
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    chunks = packed_chunks(tokenizer, TINY_CORPUS, 3000, 64)
    c0, count = second_moments(ModelAccess(model, resolve_layout(model)), chunks, TINY_LAYERS,
                               tokenizer.pad_token_id, 512, progress=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["count"] == count
        for layer in TINY_LAYERS:
            # Each batch's k kᵀ is summed in float32 and the processes batch differently: float32 rounding.
            assert float((got["c0"][layer] - c0[layer]).norm() / c0[layer].norm()) < 1e-6
