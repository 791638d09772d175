"""Where an edit's C₀ comes from (docs/algorithm.md §5): this process's memory, the disk cache, or one pass over a
corpus; and which C₀ an adapter's earlier edits were solved with.

The policy, in one place:

* C₀ is always measured on the unedited base model, and cached on disk under a key made of the base model's
  fingerprint, the layer, the corpus's content hash and the token count (``stats.stats_cache_key``).
* An adapter records a reference to the C₀ of each layer (``EditState.stats_refs``), never the data; a resumed
  adapter keeps using the statistics its earlier edits were solved with unless it is given a corpus.
* Statistics embedded in a saved adapter (``save_statistics=True``) are added to the memory when it is loaded.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, ContextManager

from ..config import EncoreConfig, default_stats_tokens
from .corpus import Corpus, generated_corpus, generated_corpus_id, packed_chunks, read_corpus
from .state import EditState, LayerStatistics
from .stats import is_main_process, load_cached, save_cached, second_moments, stats_cache_key
from .tracing import ModelAccess

logger = logging.getLogger(__name__)

SecondMoments = Callable[..., tuple[dict[int, "torch.Tensor"], int]]  # noqa: F821 - stats.second_moments's shape


class StatisticsCache:
    """C₀ by cache key, for the adapters of one base model (fingerprint ``base_fingerprint``)."""

    def __init__(self, base_fingerprint: str, directory: Path) -> None:
        self.base_fingerprint = base_fingerprint
        self.directory = Path(directory)
        self.loaded: dict[str, LayerStatistics] = {}

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def add(self, key: str, stats: LayerStatistics) -> None:
        """Keep ``stats`` (e.g. embedded in a loaded adapter) for the edits that refer to ``key``."""
        self.loaded[key] = stats

    def for_edit(
        self,
        access: ModelAccess,
        tokenizer,
        config: EncoreConfig,
        state: EditState,
        corpus: Corpus,
        *,
        adapter: str,
        unedited: Callable[[], ContextManager] = contextlib.nullcontext,
        second_moments: SecondMoments = second_moments,
        progress: bool = True,
    ) -> dict[int, LayerStatistics]:
        """C₀ of every layer ``config`` edits, by layer, recording their references in ``state``.

        ``corpus``: text files, a list of strings or a ``datasets`` dataset; ``None``: the statistics the adapter's
        earlier edits used, else model-generated text. ``unedited``: a context in which the model is its unedited
        base. ``second_moments``: the step that measures C₀ (``stats.second_moments`` or a reference one).
        """
        mlp_out = access.layout.mlp_out
        d_k = access.w_out(config.layers[0]).in_features
        recorded = [state.stats_refs.get(layer) for layer in config.layers]
        resumed = corpus is None and all(recorded)
        # A resumed adapter keeps the budget its earlier edits used, even one set by an earlier release's default.
        n_tokens = config.stats_n_tokens or (recorded[-1]["n_tokens"] if resumed else
                                             default_stats_tokens(d_k, generated=corpus is None))
        texts = read_corpus(corpus, tokenizer, n_tokens) if corpus is not None else None
        if resumed:
            # A resumed adapter keeps using the statistics its earlier edits were solved with.
            keys = {layer: ref["cache_key"] for layer, ref in zip(config.layers, recorded)}
            corpus_id = recorded[-1]["corpus_id"]
        else:
            corpus_id = texts.corpus_id if texts else generated_corpus_id(config.seed, n_tokens)
            keys = {layer: stats_cache_key(self.base_fingerprint, layer, mlp_out, corpus_id,
                                           n_tokens, config.stats_seq_len) for layer in config.layers}
            changed = [layer for layer, ref in zip(config.layers, recorded) if ref and ref["cache_key"] != keys[layer]]
            if changed:
                logger.warning("Adapter %r switches statistics for layers %s (corpus %s, was %s)", adapter, changed,
                               corpus_id, state.stats_refs[changed[0]]["corpus_id"])
        meta = {"model_fingerprint": self.base_fingerprint, "corpus_id": corpus_id, "n_tokens_asked": str(n_tokens)}
        found: dict[int, LayerStatistics] = {}
        for layer, key in keys.items():
            if key in self.loaded:
                found[layer] = self.loaded[key]
                continue
            c0 = load_cached(self.path(key), {**meta, "layer": str(layer)})
            if c0 is not None:
                found[layer] = self.loaded[key] = LayerStatistics(c0, n_tokens)
        missing = [layer for layer in config.layers if layer not in found]
        if missing and resumed:
            raise FileNotFoundError(
                f"The statistics adapter {adapter!r} was edited with (layers {missing}, corpus {corpus_id}) are not "
                "in this machine's cache: pass the same corpus (corpus=...), or save the adapter with "
                "save_statistics=True so that they travel with it")
        if missing:
            with unedited():
                if texts is None:
                    texts = generated_corpus(access.lm, tokenizer, n_tokens, seed=config.seed)
                chunks = packed_chunks(tokenizer, texts.texts, n_tokens, config.stats_seq_len)
                moments, counted = second_moments(access, chunks, missing, tokenizer.pad_token_id,
                                                  config.max_tokens_per_forward, progress)
            for layer in missing:
                # Rounded to the float32 the cache stores, so a resumed run sees exactly the same C₀ (and the
                # float64 sum is freed before the next layer's is rounded).
                c0 = moments.pop(layer).float()
                if is_main_process():  # under torch.distributed every process holds the same C₀; one writes it
                    save_cached(self.path(keys[layer]), c0,
                                {**meta, "layer": str(layer), "n_tokens": str(counted), "corpus": texts.description})
                found[layer] = self.loaded[keys[layer]] = LayerStatistics(c0, counted)
        for layer in config.layers:
            state.stats_refs[layer] = {"cache_key": keys[layer], "corpus_id": corpus_id, "n_tokens": n_tokens}
            # Held as the config says (float32 for large d_k), once: the converted copy replaces the loaded one.
            found[layer] = self.loaded[keys[layer]] = found[layer].stored_as(
                config.moments_storage_dtype(d_k), access.moments_device(layer, config.moments_device))
        return found

    def recorded(self, state: EditState, adapter: str) -> dict[int, LayerStatistics]:
        """C₀ of each layer the adapter's edits were solved with (from memory or the disk cache), by layer."""
        found = {}
        for layer, ref in state.stats_refs.items():
            stats = self.loaded.get(ref["cache_key"])
            if stats is None:
                c0 = load_cached(self.path(ref["cache_key"]), {"corpus_id": ref["corpus_id"]})
                stats = LayerStatistics(c0, ref["n_tokens"]) if c0 is not None else None
            if stats is None:
                raise FileNotFoundError(f"The statistics of layer {layer} of adapter {adapter!r} are neither "
                                        "loaded nor cached on this machine")
            found[layer] = stats
        return found

