"""EncoreModel: the PEFT tuner. It injects the layer wrappers (``layer.Linear``), holds each adapter's editing
state and the statistics cache, and makes ``edit()`` a transaction: the batch itself is
``editing/pipeline.py: edit_batch``; if it raises, the deltas and the editing state are restored bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Mapping, Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner

from .architectures import MODEL_LAYOUTS, ModelLayout, get_blocks, layers_for, resolve_layout, target_module_regex
from .config import EncoreConfig
from .editing.corpus import Corpus
from .editing.pipeline import FAST_STEPS, EditSteps, edit_batch
from .editing.prompt_format import prompt_format
from .editing.report import EditReport
from .editing.requests import EditRequest, parse_requests, prepare_requests
from .editing.state import EditState, LayerStatistics
from .editing.stats_cache import StatisticsCache
from .editing.tracing import ModelAccess
from .fingerprint import combined_fingerprint, measure_base, record_or_check_base
from .layer import EncoreLayer, Linear, base_in_out_features
from .loading import cache_dir


class EditStateMissingError(RuntimeError):
    """An adapter holds edits but not the memory of them that further edits need."""


def edited_layer_shapes(model: torch.nn.Module, config: EncoreConfig) -> dict[int, tuple[int, int]]:
    """(d_v, d_k) of W_out at each layer ``config`` edits: the shape of that layer's delta."""
    layout = resolve_layout(model, config.block_path, config.mlp_out)
    blocks = get_blocks(model, layout)
    layers = layers_for(model, layout, config.layers)
    shapes = {}
    for layer in layers:
        module = blocks[layer].get_submodule(layout.mlp_out)
        d_k, d_v = (module.in_features, module.out_features) if isinstance(module, EncoreLayer) else \
            base_in_out_features(module)
        shapes[layer] = (d_v, d_k)
    return shapes


class EncoreModel(BaseTuner):
    """Knowledge-editing adapter: dense deltas on the MLP output projections of a few layers, written in closed
    form by MEMIT / AlphaEdit / ENCORE (``edit``)."""

    prefix: str = "encore_"
    tuner_layer_cls = EncoreLayer
    target_module_mapping = {name: [row.mlp_out.rsplit(".", 1)[-1]] for name, row in MODEL_LAYOUTS.items()}
    # The editing state lives on the tuner, but the deltas alone define the forward pass, so transformers'
    # ``load_adapter`` (which injects layers without keeping a tuner) can serve an adapter for inference.
    uses_shared_state = False

    # ---- PEFT hooks -------------------------------------------------------------------------------------------

    def inject_adapter(self, model, adapter_name: str, **kwargs) -> None:
        # PEFT calls _pre_injection_hook only for the first adapter; added and loaded ones come through here.
        self._prepare_adapter(model, self.peft_config[adapter_name], adapter_name)
        super().inject_adapter(model, adapter_name, **kwargs)

    def _prepare_adapter(self, model, config: EncoreConfig, adapter_name: str) -> None:
        """Resolve the layers and target modules, record or check the base fingerprint, start the edit state."""
        self.__dict__.setdefault("edit_states", {})
        self.__dict__.setdefault("tokenizer", None)
        self.__dict__.setdefault("stats_corpus", None)
        layout = resolve_layout(model, config.block_path, config.mlp_out)
        config.layers = layers_for(model, layout, config.layers)
        # A loaded adapter's base was measured before PEFT touched the model (peft_model.check_adapter).
        measured = getattr(config, "_measured_base", None) or measure_base(model, layout, config.layers)
        if "statistics" not in self.__dict__:
            # Keyed by the whole base model's weights: C₀ of one model is never used for another.
            self.__dict__["statistics"] = StatisticsCache(combined_fingerprint(measured[1]), cache_dir() / "stats")
        config.target_modules = target_module_regex(layout, config.layers)
        if config.gguf_file is None:
            config.gguf_file = getattr(model, "gguf_file", None)
        if config.base_model_builtin is None:
            config.base_model_builtin = getattr(model, "hf_encore_builtin", None)
        if config.base_model_name_or_path is None:
            # PEFT fills this in only when saving; recorded now, the adapter names its base from the start.
            config.base_model_name_or_path = model.__dict__.get("name_or_path") or None
        record_or_check_base(config, adapter_name, measured)
        self.edit_states[adapter_name] = EditState()

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, EncoreLayer):
            target.update_layer(adapter_name)
        else:
            new_module = Linear(target, adapter_name)
            self._replace_module(parent, target_name, new_module, target)
            # PEFT puts adapter weights on the base weight's device: ``meta`` where accelerate offloads the layer.
            new_module.place_deltas()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.edit_states.pop(adapter_name, None)

    # ---- helpers ----------------------------------------------------------------------------------------------

    def set_editing_inputs(self, tokenizer=None, corpus: Corpus = None) -> None:
        """Keep the tokenizer and the statistics corpus that ``edit()`` uses when not given them."""
        if tokenizer is not None:
            self.__dict__["tokenizer"] = tokenizer
        if corpus is not None:
            self.__dict__["stats_corpus"] = corpus

    def _layout(self, config: EncoreConfig) -> ModelLayout:
        return resolve_layout(self.model, config.block_path, config.mlp_out)

    def _get_tokenizer(self, tokenizer=None):
        if tokenizer is not None:
            self.__dict__["tokenizer"] = tokenizer
        if self.tokenizer is None:
            from .loading import load_tokenizer

            builtin = getattr(self.model, "hf_encore_builtin", None)  # its name_or_path is the Hub id it copies
            source = builtin or getattr(self.model, "name_or_path", None)
            if not source:
                raise ValueError("No tokenizer: pass tokenizer= to get_encore_model or edit()")
            gguf_file = None if builtin else getattr(self.model, "gguf_file", None)
            self.__dict__["tokenizer"] = load_tokenizer(source, gguf_file=gguf_file)
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def _edit_target(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise ValueError(f"Several adapters are active ({self.active_adapters}): name one with adapter_name=")
            adapter_name = self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; have {sorted(self.peft_config)}")
        if adapter_name not in self.active_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is not active: call set_adapter({adapter_name!r}) first, "
                             "so that edits build on its earlier edits")
        return adapter_name

    def _edited_modules(self, access: ModelAccess, config: EncoreConfig, adapter: str) -> dict[int, Linear]:
        modules = {}
        for layer in config.layers:
            module = access.w_out(layer)
            if not isinstance(module, Linear) or adapter not in module.encore_delta:
                raise RuntimeError(f"layer {layer} has no Encore delta for adapter {adapter!r}")
            if module.merged:
                raise RuntimeError("The adapter is merged into the weights: call unmerge_adapter() before editing")
            if module.disable_adapters:
                raise RuntimeError("Adapters are disabled: edit outside the disable_adapter() context")
            module.place_deltas()  # float32 where the layer runs, even after model.to(dtype or device)
            modules[layer] = module
        return modules

    # ---- statistics -------------------------------------------------------------------------------------------

    def compute_statistics(
        self,
        corpus: Corpus = None,
        *,
        adapter_name: str | None = None,
        tokenizer=None,
        progress: bool = True,
        steps: EditSteps = FAST_STEPS,
    ) -> dict[int, LayerStatistics]:
        """C₀ for every edited layer of the adapter, from the disk cache or in one pass over ``corpus`` (text
        files, a list of strings, a ``datasets`` dataset; ``None``: the corpus set on the model, else
        model-generated text). Always measured on the unedited base model (``editing/stats_cache.py``)."""
        adapter = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter]
        return self.statistics.for_edit(
            ModelAccess(self.model, self._layout(config)), self._get_tokenizer(tokenizer), config,
            self.edit_states[adapter], corpus if corpus is not None else self.stats_corpus, adapter=adapter,
            unedited=self.disable_adapter_ctx, second_moments=steps.second_moments, progress=progress)

    def recorded_statistics(self, adapter_name: str) -> dict[int, LayerStatistics]:
        """C₀ of each layer the adapter's edits were solved with (from memory or the disk cache), by layer."""
        return self.statistics.recorded(self.edit_states[adapter_name], adapter_name)

    @contextlib.contextmanager
    def disable_adapter_ctx(self):
        """Context in which every adapter is off (the unedited base model)."""
        was_disabled = any(m.disable_adapters for m in self.model.modules() if isinstance(m, EncoreLayer))
        self._enable_adapter_layers(enabled=False)  # PEFT's own switch
        try:
            yield
        finally:
            if not was_disabled:
                self._enable_adapter_layers(enabled=True)

    # ---- editing ----------------------------------------------------------------------------------------------

    def edit(
        self,
        requests: Sequence[Mapping[str, Any] | EditRequest],
        *,
        adapter_name: str | None = None,
        tokenizer=None,
        corpus: Corpus = None,
        progress: bool = True,
        start_new_memory: bool = False,
        steps: EditSteps = FAST_STEPS,
        **overrides: Any,
    ) -> EditReport:
        """Write a batch of facts into the adapter's deltas (docs/algorithm.md §2–5) and return a report.

        ``requests``: mappings with ``prompt`` (one ``{}`` for the subject), ``subject``, ``target_new``.
        ``overrides``: any :class:`EncoreConfig` setting for this call only (e.g. ``v_num_grad_steps=10``).
        If anything fails, the deltas and the editing state are exactly as before the call.
        ``start_new_memory``: allow editing an adapter that holds edits but not their editing state (one loaded by
        plain PEFT, or saved with ``save_editing_state=False``); earlier edits are then protected only by C₀.
        ``steps``: the implementations of the steps that read the model (``editing.reference.REFERENCE_STEPS``
        runs the straightforward ones, for benchmarks and tests).
        """
        t_start = time.perf_counter()
        adapter = self._edit_target(adapter_name)
        config = self.peft_config[adapter].with_overrides(**overrides)
        parsed = parse_requests(requests)
        tokenizer = self._get_tokenizer(tokenizer)
        access = ModelAccess(self.model, self._layout(config))
        modules = self._edited_modules(access, config, adapter)
        # Fails on an unlocatable subject, or a chat form without a chat template, before anything changes.
        prepare_requests(tokenizer, parsed, ["{}"], prompt_format(tokenizer, config.prompt_format))
        state = self.edit_states[adapter]
        if state.num_batches == 0 and not start_new_memory and any(
                bool(m.encore_delta[adapter].any()) for m in modules.values()):
            raise EditStateMissingError(
                f"Adapter {adapter!r} holds edits but not their editing state (the memory of earlier edits that "
                "keeps new edits from overwriting them). Load it with hf_encore.from_pretrained(base, path) to "
                "continue editing, or pass start_new_memory=True to edit without that memory.")
        saved_state = state.snapshot()
        saved_deltas = {layer: m.encore_delta[adapter].detach().clone() for layer, m in modules.items()}
        statistics = lambda: self.compute_statistics(  # noqa: E731
            corpus, adapter_name=adapter, tokenizer=tokenizer, progress=progress, steps=steps)
        try:
            report = edit_batch(access, modules, adapter, config, state, parsed, tokenizer, statistics,
                                unedited=self.disable_adapter_ctx, steps=steps, progress=progress)
        except BaseException:
            with torch.no_grad():
                for layer, module in modules.items():
                    module.encore_delta[adapter].copy_(saved_deltas[layer])
            state.restore(saved_state)
            raise
        report.seconds["total"] = time.perf_counter() - t_start
        return report

    # ---- several adapters -------------------------------------------------------------------------------------

    def combine_adapters(self, adapters: Sequence[str], combined_name: str) -> None:
        """Add ``combined_name`` holding the edits of all ``adapters`` (same layers): deltas and edit memories are
        summed, ledgers joined, so the combined adapter can be edited further like any other."""
        if combined_name in self.peft_config:
            raise ValueError(f"An adapter named {combined_name!r} already exists")
        if not adapters:
            raise ValueError("combine_adapters needs at least one adapter")
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"combine_adapters names an adapter twice: {list(adapters)}")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"No adapter(s) {missing}; have {sorted(self.peft_config)}")
        configs = [self.peft_config[a] for a in adapters]
        if any(c.layers != configs[0].layers or c.base_model_fingerprint != configs[0].base_model_fingerprint
               for c in configs):
            raise ValueError("Only adapters on the same layers of the same base model can be combined")
        self.peft_config[combined_name] = dataclasses.replace(configs[0], inference_mode=True)
        self.inject_adapter(self.model, combined_name)
        self.edit_states[combined_name] = EditState.combined({a: self.edit_states[a] for a in adapters})
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, Linear) and combined_name in module.encore_delta:
                    module.encore_delta[combined_name].copy_(sum(module.encore_delta[a] for a in adapters))
