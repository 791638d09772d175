"""EncoreModel: the PEFT tuner. Injects the layer wrappers, owns the editing state and orchestrates ``edit()``.

The flow of one ``edit()`` (docs/architecture.md):

    validate requests → context templates → C₀ per layer → z for every request at the critical layer L
    → for each edited layer l (low → high): K_l, H on the current model; R = (Z − H)/(layers left);
      ΔW_l = solve(...); add ΔW_l to the adapter's delta
    → commit S_prev += K Kᵀ, ledger, report   (or restore everything exactly as it was)
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner

from .architectures import MODEL_LAYOUTS, ModelLayout, layers_for, resolve_layout, target_module_regex
from .config import EncoreConfig
from .editing.keys import keys_and_outputs
from .editing.report import EditReport, LayerReport, RequestReport
from .editing.requests import EditRequest, parse_requests, prepare_requests
from .editing.solve import absolute_regularisers, layer_residual, nullspace_projector, solve_update
from .editing.state import EditState, LayerStatistics
from .editing.stats import (
    Corpus, generated_corpus, load_cached, model_fingerprint, packed_chunks, read_corpus, save_cached,
    second_moments, stats_cache_key,
)
from .editing.targets import TargetSettings, optimise_targets, target_probabilities
from .editing.templates import generate_context_templates
from .editing.tracing import ModelAccess
from .layer import EncoreLayer, Linear
from .models import cache_dir

logger = logging.getLogger(__name__)


class EncoreModel(BaseTuner):
    """Knowledge-editing adapter: dense deltas on the MLP output projections of a few layers, written in closed
    form by MEMIT / AlphaEdit / ENCORE (``edit``)."""

    prefix: str = "encore_"
    tuner_layer_cls = EncoreLayer
    target_module_mapping = {name: [row.mlp_out.rsplit(".", 1)[-1]] for name, row in MODEL_LAYOUTS.items()}
    uses_shared_state = True

    # ---- PEFT hooks -------------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model, config: EncoreConfig, adapter_name: str) -> None:
        self.__dict__.setdefault("edit_states", {})
        self.__dict__.setdefault("_stats", {})
        self.__dict__.setdefault("tokenizer", None)
        self.__dict__.setdefault("stats_corpus", None)
        layout = resolve_layout(model, config.block_path, config.mlp_out)
        config.layers = layers_for(model, layout, config.layers)
        config.target_modules = target_module_regex(layout, config.layers)
        if "_base_fingerprint" not in self.__dict__:
            self.__dict__["_base_fingerprint"] = model_fingerprint(model)
        if config.base_model_fingerprint is None:
            config.base_model_fingerprint = self._base_fingerprint
        self.edit_states[adapter_name] = EditState()

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, EncoreLayer):
            target.update_layer(adapter_name)
        else:
            self._replace_module(parent, target_name, Linear(target, adapter_name), target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.edit_states.pop(adapter_name, None)

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _layout(self, config: EncoreConfig) -> ModelLayout:
        return resolve_layout(self.model, config.block_path, config.mlp_out)

    def _get_tokenizer(self, tokenizer=None):
        if tokenizer is not None:
            self.__dict__["tokenizer"] = tokenizer
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            source = getattr(self.model, "name_or_path", None)
            if not source:
                raise ValueError("No tokenizer: pass tokenizer= to get_encore_model or edit()")
            self.__dict__["tokenizer"] = AutoTokenizer.from_pretrained(source)
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
    ) -> dict[int, LayerStatistics]:
        """C₀ for every edited layer of the adapter, from the disk cache or in one pass over ``corpus`` (text
        files, a list of strings, a ``datasets`` dataset; ``None``: the corpus set on the model, else
        model-generated text). Always measured on the unedited base model."""
        adapter = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter]
        tokenizer = self._get_tokenizer(tokenizer)
        access = ModelAccess(self.model, self._layout(config))
        mlp_out = access.layout.mlp_out
        corpus = corpus if corpus is not None else self.stats_corpus
        d_k = access.w_out(config.layers[0]).in_features
        n_tokens = config.stats_n_tokens or max(10_000, 10 * d_k)
        texts = read_corpus(corpus) if corpus is not None else None
        corpus_id = texts.corpus_id if texts else f"generated-{config.seed}-{n_tokens}"
        keys = {layer: stats_cache_key(self._base_fingerprint, layer, mlp_out, corpus_id,
                                       n_tokens, config.stats_seq_len) for layer in config.layers}
        meta = {"model_fingerprint": self._base_fingerprint, "corpus_id": corpus_id, "n_tokens_asked": str(n_tokens)}
        found: dict[int, LayerStatistics] = {}
        for layer, key in keys.items():
            if key in self._stats:
                found[layer] = self._stats[key]
                continue
            c0 = load_cached(self._stats_path(key), {**meta, "layer": str(layer)})
            if c0 is not None:
                found[layer] = self._stats[key] = LayerStatistics(c0, n_tokens)
        missing = [layer for layer in config.layers if layer not in found]
        if missing:
            with self.disable_adapter_ctx():
                if texts is None:
                    texts = generated_corpus(self.model, tokenizer, n_tokens, seed=config.seed)
                chunks = packed_chunks(tokenizer, texts.texts, n_tokens, config.stats_seq_len)
                moments, counted = second_moments(access, chunks, missing, tokenizer.pad_token_id,
                                                  config.max_tokens_per_forward, progress)
            for layer in missing:
                save_cached(self._stats_path(keys[layer]), moments[layer],
                            {**meta, "layer": str(layer), "n_tokens": str(counted), "corpus": texts.description})
                found[layer] = self._stats[keys[layer]] = LayerStatistics(moments[layer], counted)
        state = self.edit_states[adapter]
        for layer in config.layers:
            state.stats_refs[layer] = {"cache_key": keys[layer], "corpus_id": corpus_id, "n_tokens": n_tokens}
        return found

    @staticmethod
    def _stats_path(key: str) -> Path:
        return cache_dir() / "stats" / f"{key}.safetensors"

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
        **overrides: Any,
    ) -> EditReport:
        """Write a batch of facts into the adapter's deltas (ALGORITHM.md §2–5) and return a report.

        ``requests``: mappings with ``prompt`` (one ``{}`` for the subject), ``subject``, ``target_new``.
        ``overrides``: any :class:`EncoreConfig` setting for this call only (e.g. ``v_num_grad_steps=10``).
        If anything fails, the deltas and the editing state are exactly as before the call.
        """
        t_start = time.perf_counter()
        adapter = self._edit_target(adapter_name)
        config = self.peft_config[adapter].with_overrides(**overrides)
        parsed = parse_requests(requests)
        tokenizer = self._get_tokenizer(tokenizer)
        access = ModelAccess(self.model, self._layout(config))
        modules = self._edited_modules(access, config, adapter)
        prepare_requests(tokenizer, parsed, ["{}"])  # fails on an unlocatable subject before anything changes
        state = self.edit_states[adapter]
        saved_state = state.snapshot()
        saved_deltas = {layer: m.encore_delta[adapter].detach().clone() for layer, m in modules.items()}
        try:
            report = self._edit_batch(access, modules, config, adapter, parsed, tokenizer, corpus, progress)
        except BaseException:
            with torch.no_grad():
                for layer, module in modules.items():
                    module.encore_delta[adapter].copy_(saved_deltas[layer])
            state.restore(saved_state)
            raise
        report.seconds["total"] = time.perf_counter() - t_start
        return report

    def _edit_batch(self, access, modules, config, adapter, parsed, tokenizer, corpus, progress) -> EditReport:
        seconds: dict[str, float] = {}
        state = self.edit_states[adapter]
        pad_id = tokenizer.pad_token_id
        budget = config.max_tokens_per_forward

        tick = time.perf_counter()
        if state.context_templates is None:
            with self.disable_adapter_ctx():
                state.context_templates = generate_context_templates(
                    self.model, tokenizer, count=config.n_context_templates,
                    length=config.context_template_length, seed=config.seed)
        prepared = prepare_requests(tokenizer, parsed, state.context_templates)
        seconds["templates"] = time.perf_counter() - tick

        tick = time.perf_counter()
        stats = self.compute_statistics(corpus, adapter_name=adapter, tokenizer=tokenizer, progress=progress)
        seconds["statistics"] = time.perf_counter() - tick

        tick = time.perf_counter()
        critical = config.layers[-1]
        settings = TargetSettings(
            lr=config.v_lr, num_steps=config.v_num_grad_steps, clamp_norm_factor=config.clamp_norm_factor,
            weight_decay=config.v_weight_decay, kl_factor=config.kl_factor, mpes=config.mpes,
            mpes_extra_steps=config.mpes_extra_steps, mpes_check_raw_prompt=config.mpes_check_raw_prompt,
            max_tokens_per_forward=budget)
        targets = optimise_targets(access, prepared, critical, settings, pad_id, progress)
        if not torch.isfinite(targets.z).all():
            raise FloatingPointError("non-finite target hidden states")
        seconds["targets"] = time.perf_counter() - tick

        seconds["keys"] = seconds["solve"] = 0.0
        z = targets.z.double().T  # [d_v, n]
        new_moments: dict[int, torch.Tensor] = {}
        layer_reports = []
        with torch.no_grad():
            for i, layer in enumerate(config.layers):
                tick = time.perf_counter()
                keys, outputs = keys_and_outputs(access, prepared, layer, critical, pad_id, budget)
                seconds["keys"] += time.perf_counter() - tick
                tick = time.perf_counter()
                residual = layer_residual(z, outputs, len(config.layers) - i)
                c0 = stats[layer]
                lam_p, ridge, threshold = absolute_regularisers(
                    c0.c0, config.preservation_weight, config.norm_weight, config.nullspace_threshold,
                    config.regularizer_scale == "relative")
                projector = self._projector(c0, threshold) if config.nullspace_projection else None
                prev = state.prev_key_moments.get(layer)
                preserved = lam_p * c0.c0 if lam_p else torch.zeros_like(c0.c0)
                if prev is not None:
                    preserved = preserved + prev
                update = solve_update(keys, residual, preserved, ridge, projector)
                if not torch.isfinite(update).all():
                    raise FloatingPointError(f"non-finite update at layer {layer}")
                delta = modules[layer].encore_delta[adapter]
                delta.add_(update.to(delta.dtype, copy=False).to(delta.device))
                new_moments[layer] = (prev if prev is not None else 0) + keys @ keys.T
                base_weight = modules[layer].get_base_layer().weight
                w0_norm = float(base_weight.double().norm())
                w_norm = float((base_weight.double() + modules[layer].get_delta_weight(adapter).double()).norm())
                layer_reports.append(LayerReport(layer, float(update.norm()), w_norm / w0_norm))
                seconds["solve"] += time.perf_counter() - tick

        p_after = target_probabilities(access, prepared, pad_id, budget)
        state.prev_key_moments.update(new_moments)
        state.num_edits += len(parsed)
        state.num_batches += 1
        request_reports = [
            RequestReport(r.prompt, r.subject, r.target_new, targets.steps[i], targets.mpes_stopped[i],
                          targets.p_target_before[i], float(p_after[i]), targets.final_loss[i])
            for i, r in enumerate(parsed)
        ]
        report = EditReport(config.method, adapter, request_reports, layer_reports, seconds)
        state.ledger.append({
            "batch": state.num_batches, "time": time.time(), "method": config.method,
            "settings": {k: getattr(config, k) for k in (
                "mpes", "mpes_extra_steps", "preservation_weight", "norm_weight", "nullspace_projection",
                "nullspace_threshold", "regularizer_scale", "v_lr", "v_num_grad_steps")},
            "requests": [vars(r) for r in parsed],
            "report": {"requests": [vars(r) for r in request_reports], "layers": [vars(x) for x in layer_reports]},
        })
        return report

    @staticmethod
    def _projector(stats: LayerStatistics, threshold: float) -> torch.Tensor:
        if stats.projector is None or stats.projector_threshold != threshold:
            stats.projector = nullspace_projector(stats.c0, threshold)
            stats.projector_threshold = threshold
        return stats.projector
