"""EncoreModel: the PEFT tuner. Injects the layer wrappers, owns the editing state and orchestrates ``edit()``.

The flow of one ``edit()`` (docs/architecture.md):

    validate requests → context templates → C₀ per layer → z for every request at the critical layer L
    → for each edited layer l (low → high): K_l, H on the current model; R = (Z − H)/(layers left);
      ΔW_l = solve(...); add ΔW_l to the adapter's delta
    → commit S_prev += K Kᵀ, ledger, report   (or restore everything exactly as it was)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner

from .architectures import MODEL_LAYOUTS, ModelLayout, get_blocks, layers_for, resolve_layout, target_module_regex
from .config import NORM_RATIO_WARNING, EncoreConfig
from .editing.keys import key_pass_inputs, keys_and_outputs
from .editing.report import EditReport, LayerReport, RequestReport
from .editing.requests import EditRequest, parse_requests, prepare_requests
from .editing.solve import (
    absolute_regularisers, layer_residual, nullspace_projector, pre_norm_residual, solve_update)
from .editing.state import EditState, LayerStatistics
from .editing.stats import (
    Corpus, generated_corpus, load_cached, model_fingerprint, packed_chunks, read_corpus, save_cached,
    second_moments, stats_cache_key, tensors_fingerprint,
)
from .editing.targets import TargetSettings, optimise_targets, target_probabilities
from .editing.templates import generate_context_templates
from .editing.tracing import ModelAccess
from .layer import EncoreLayer, Linear, base_in_out_features
from .loading import cache_dir

logger = logging.getLogger(__name__)

# Values sampled from each tensor for the base-model fingerprint (see parts_fingerprint).
PARTS_FINGERPRINT_SAMPLES = 4096


class BaseModelMismatchError(ValueError):
    """The adapter was made for other base weights than the ones it is being attached to."""


class EditStateMissingError(RuntimeError):
    """An adapter holds edits but not the memory of them that further edits need."""


class NormRatioExceededError(ValueError):
    """A batch would have grown an edited layer's ‖W‖/‖W₀‖ past ``max_norm_ratio`` (the batch is rolled back)."""


def likely_norm_cause(config: EncoreConfig, num_edits: int) -> str:
    """The settings most likely behind an unusually large update: those set more aggressively than the method's
    defaults, else the accumulated edits themselves."""
    preset = EncoreConfig(method=config.method, regularizer_scale=config.regularizer_scale)
    weaker = [f"{name}={getattr(config, name)!r} (default {getattr(preset, name)!r})"
              for name in ("preservation_weight", "norm_weight") if getattr(config, name) < getattr(preset, name)]
    stronger = [f"{name}={getattr(config, name)!r} (default {getattr(preset, name)!r})"
                for name in ("v_lr", "clamp_norm_factor", "v_num_grad_steps") if getattr(config, name) > getattr(preset, name)]
    if config.regularizer_scale == "absolute":
        weaker.insert(0, "regularizer_scale='absolute' (the papers' numbers are for 8B models)")
    if weaker or stronger:
        return "likely from " + ", ".join(weaker + stronger)
    if config.norm_weight == 0:
        return f"{num_edits} edits with no norm constraint (norm_weight=0; method='encore' adds one)"
    return f"{num_edits} edits so far; a larger norm_weight slows the growth"


def check_norm_growth(layer_reports: Sequence[LayerReport], config: EncoreConfig, num_edits: int) -> None:
    """Refuse a batch past ``config.max_norm_ratio`` (raises, so edit() rolls it back); warn past
    ``NORM_RATIO_WARNING``. Both name the layer, the figure and the settings likely responsible."""
    worst = max(layer_reports, key=lambda r: r.weight_norm_ratio)
    ratio = worst.weight_norm_ratio
    if config.max_norm_ratio is not None and ratio > config.max_norm_ratio:
        raise NormRatioExceededError(
            f"this batch would make ‖W‖/‖W₀‖ of layer {worst.layer} {ratio:.4g}, above max_norm_ratio="
            f"{config.max_norm_ratio} ({likely_norm_cause(config, num_edits)}); the batch was not applied")
    if ratio > NORM_RATIO_WARNING:
        logger.warning("After this batch ‖W‖/‖W₀‖ of layer %d is %.4g (above %.1f: the edited model is drifting "
                       "from the base), %s. Set max_norm_ratio to refuse such batches.", worst.layer, ratio,
                       NORM_RATIO_WARNING, likely_norm_cause(config, num_edits))


def edited_weights_fingerprint(model: torch.nn.Module, layout: ModelLayout, layers: Sequence[int]) -> str:
    """A hash of the original W_out of the edited layers (the weights the deltas were solved against).

    Wrapped layers are read through to their base weight, and to the kept original while an adapter is merged.
    """
    blocks = get_blocks(model, layout)
    named = []
    for layer in layers:
        module = blocks[layer].get_submodule(layout.mlp_out)
        weight = module.original_weight if isinstance(module, EncoreLayer) else module.weight
        named.append((f"{layer}.{layout.mlp_out}", weight))
    return tensors_fingerprint(named)


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters and buffers by their unwrapped names, read through Encore wrappers (original
    weights while merged; no deltas)."""
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    for name, module in model.named_modules():
        if isinstance(module, EncoreLayer) and module.merged:
            named[f"{name}.base_layer.weight"] = module.original_weight
    return {name.replace(".base_layer.", "."): t for name, t in named.items() if ".encore_delta." not in name}


def parts_fingerprint(model: torch.nn.Module, layout: ModelLayout) -> dict[str, str]:
    """A sampled fingerprint of each part of the model: every decoder block, and every module outside them
    (embeddings, final norm, unembedding).

    The keys an edit is solved for depend on every layer below the edited ones and its targets on the whole model,
    so an adapter must meet the same weights everywhere. Hashing every byte of an 8B model takes minutes; a
    strided sample of each tensor (names, shapes, dtypes and ``PARTS_FINGERPRINT_SAMPLES`` values) takes
    milliseconds and still tells another model, quantisation or fine-tune apart.
    """
    prefix = layout.block_path + "."
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in base_parameters(model).items():
        if name.startswith(prefix):
            part = prefix + name[len(prefix):].split(".", 1)[0]
        else:
            part = name.rsplit(".", 1)[0] if "." in name else name
        groups.setdefault(part, []).append((name, tensor))
    return {part: tensors_fingerprint(named, samples=PARTS_FINGERPRINT_SAMPLES) for part, named in groups.items()}


def base_mismatch(recorded: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """The parts whose fingerprints differ, or that one side lacks (sorted, blocks in numeric order)."""
    differ = [p for p in set(recorded) | set(actual) if recorded.get(p) != actual.get(p)]
    return sorted(differ, key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")])


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
        """Resolve the layers and target modules, record and check the base fingerprint, start the edit state."""
        self.__dict__.setdefault("edit_states", {})
        self.__dict__.setdefault("_stats", {})
        self.__dict__.setdefault("tokenizer", None)
        self.__dict__.setdefault("stats_corpus", None)
        layout = resolve_layout(model, config.block_path, config.mlp_out)
        config.layers = layers_for(model, layout, config.layers)
        config.target_modules = target_module_regex(layout, config.layers)
        if "_base_fingerprint" not in self.__dict__:
            self.__dict__["_base_fingerprint"] = model_fingerprint(model)
        if config.gguf_file is None:
            config.gguf_file = getattr(model, "gguf_file", None)
        actual = edited_weights_fingerprint(model, layout, config.layers)
        parts = parts_fingerprint(model, layout)
        differ = base_mismatch(config.base_model_parts_fingerprint, parts) \
            if config.base_model_parts_fingerprint is not None else []
        if config.base_model_fingerprint is None:
            config.base_model_fingerprint = actual
        if config.base_model_parts_fingerprint is None:
            config.base_model_parts_fingerprint = parts
        if config.base_model_fingerprint != actual or differ:
            where = (f"these parts differ: {', '.join(differ[:8])}{' …' if len(differ) > 8 else ''} "
                     f"({len(differ)} of {len(parts)})" if differ else
                     f"the weights of its edited layers {config.layers} differ")
            made_on = ", ".join(x for x in (config.base_model_name_or_path and repr(config.base_model_name_or_path),
                                            config.gguf_file and f"GGUF {config.gguf_file}") if x)
            message = (f"Adapter {adapter_name!r} was made for another base model{f' ({made_on})' if made_on else ''}"
                       f": {where}. Its edits were solved "
                       "against those weights. To attach it anyway, pass ignore_base_mismatch=True to "
                       "hf_encore.from_pretrained / load_adapter.")
            if not getattr(config, "_ignore_base_mismatch", False):
                raise BaseModelMismatchError(message)
            logger.warning("%s Attaching it as asked.", message.split(" To attach")[0])
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

            source = getattr(self.model, "name_or_path", None)
            if not source:
                raise ValueError("No tokenizer: pass tokenizer= to get_encore_model or edit()")
            self.__dict__["tokenizer"] = load_tokenizer(source, gguf_file=getattr(self.model, "gguf_file", None))
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
        state = self.edit_states[adapter]
        d_k = access.w_out(config.layers[0]).in_features
        n_tokens = config.stats_n_tokens or max(10_000, 10 * d_k)
        recorded = [state.stats_refs.get(layer) for layer in config.layers]
        texts = read_corpus(corpus) if corpus is not None else None
        resumed = texts is None and all(recorded)
        if resumed:
            # A resumed adapter keeps using the statistics its earlier edits were solved with.
            keys = {layer: ref["cache_key"] for layer, ref in zip(config.layers, recorded)}
            corpus_id = recorded[-1]["corpus_id"]
        else:
            corpus_id = texts.corpus_id if texts else f"generated-{config.seed}-{n_tokens}"
            keys = {layer: stats_cache_key(self._base_fingerprint, layer, mlp_out, corpus_id,
                                           n_tokens, config.stats_seq_len) for layer in config.layers}
            changed = [layer for layer, ref in zip(config.layers, recorded) if ref and ref["cache_key"] != keys[layer]]
            if changed:
                logger.warning("Adapter %r switches statistics for layers %s (corpus %s, was %s)", adapter, changed,
                               corpus_id, state.stats_refs[changed[0]]["corpus_id"])
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
        if missing and resumed:
            raise FileNotFoundError(
                f"The statistics adapter {adapter!r} was edited with (layers {missing}, corpus {corpus_id}) are not "
                "in this machine's cache: pass the same corpus (corpus=...), or save the adapter with "
                "save_statistics=True so that they travel with it")
        if missing:
            with self.disable_adapter_ctx():
                if texts is None:
                    texts = generated_corpus(self.model, tokenizer, n_tokens, seed=config.seed)
                chunks = packed_chunks(tokenizer, texts.texts, n_tokens, config.stats_seq_len)
                moments, counted = second_moments(access, chunks, missing, tokenizer.pad_token_id,
                                                  config.max_tokens_per_forward, progress)
            for layer in missing:
                # Rounded to the float32 the cache stores, so a resumed run sees exactly the same C₀.
                c0 = moments[layer].float().double()
                save_cached(self._stats_path(keys[layer]), c0,
                            {**meta, "layer": str(layer), "n_tokens": str(counted), "corpus": texts.description})
                found[layer] = self._stats[keys[layer]] = LayerStatistics(c0, counted)
        for layer in config.layers:
            state.stats_refs[layer] = {"cache_key": keys[layer], "corpus_id": corpus_id, "n_tokens": n_tokens}
        return found

    def recorded_statistics(self, adapter_name: str) -> dict[int, LayerStatistics]:
        """C₀ of each layer the adapter's edits were solved with (from memory or the disk cache), by layer."""
        found = {}
        for layer, ref in self.edit_states[adapter_name].stats_refs.items():
            stats = self._stats.get(ref["cache_key"])
            if stats is None:
                c0 = load_cached(self._stats_path(ref["cache_key"]), {"corpus_id": ref["corpus_id"]})
                stats = LayerStatistics(c0, ref["n_tokens"]) if c0 is not None else None
            if stats is None:
                raise FileNotFoundError(f"The statistics of layer {layer} of adapter {adapter_name!r} are neither "
                                        "loaded nor cached on this machine")
            found[layer] = stats
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
        start_new_memory: bool = False,
        **overrides: Any,
    ) -> EditReport:
        """Write a batch of facts into the adapter's deltas (ALGORITHM.md §2–5) and return a report.

        ``requests``: mappings with ``prompt`` (one ``{}`` for the subject), ``subject``, ``target_new``.
        ``overrides``: any :class:`EncoreConfig` setting for this call only (e.g. ``v_num_grad_steps=10``).
        If anything fails, the deltas and the editing state are exactly as before the call.
        ``start_new_memory``: allow editing an adapter that holds edits but not their editing state (one loaded by
        plain PEFT, or saved with ``save_editing_state=False``); earlier edits are then protected only by C₀.
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
        if state.num_batches == 0 and not start_new_memory and any(
                bool(m.encore_delta[adapter].any()) for m in modules.values()):
            raise EditStateMissingError(
                f"Adapter {adapter!r} holds edits but not their editing state (the memory of earlier edits that "
                "keeps new edits from overwriting them). Load it with hf_encore.from_pretrained(base, path) to "
                "continue editing, or pass start_new_memory=True to edit without that memory.")
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
            lr=config.v_lr, lr_relative=config.regularizer_scale == "relative", num_steps=config.v_num_grad_steps,
            clamp_norm_factor=config.clamp_norm_factor,
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
            tick = time.perf_counter()
            key_inputs = key_pass_inputs(access, prepared, min(config.layers), pad_id, budget)
            seconds["keys"] += time.perf_counter() - tick
            for i, layer in enumerate(config.layers):
                tick = time.perf_counter()
                keys, raw_keys, outputs = keys_and_outputs(access, key_inputs, layer, critical)
                seconds["keys"] += time.perf_counter() - tick
                tick = time.perf_counter()
                residual = layer_residual(z, outputs, len(config.layers) - i)
                if config.map_through_post_norm and access.post_mlp_norm(layer) is not None:
                    mlp_out, normalised, gain = access.mlp_output_through_norm(layer, raw_keys)
                    residual = pre_norm_residual(mlp_out, normalised, residual, gain)
                c0 = stats[layer]
                lam_p, ridge, threshold = absolute_regularisers(
                    c0.c0, config.preservation_weight, config.norm_weight, config.nullspace_threshold,
                    config.regularizer_scale == "relative")
                projector = self._projector(c0, threshold) if config.nullspace_projection else None
                prev = state.prev_key_moments.get(layer)
                preserved = lam_p * c0.c0 if lam_p else torch.zeros_like(c0.c0)
                if prev is not None:
                    preserved = preserved + prev
                try:
                    update = solve_update(keys, residual, preserved, ridge, projector)
                except torch.linalg.LinAlgError as err:
                    raise ValueError(
                        f"layer {layer}: the update is not determined: C₀ (from {c0.n_tokens} tokens) leaves key "
                        f"directions that preservation_weight={config.preservation_weight} and norm_weight="
                        f"{config.norm_weight} do not regularise; use a larger statistics corpus or a positive "
                        f"norm_weight ({err})") from err
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

        check_norm_growth(layer_reports, config, state.num_edits + len(parsed))
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
            "settings": config.algorithm_settings(),
            "requests": [vars(r) for r in parsed],
            "report": {"requests": [vars(r) for r in request_reports], "layers": [vars(x) for x in layer_reports]},
        })
        return report

    # ---- several adapters -------------------------------------------------------------------------------------

    def combine_adapters(self, adapters: Sequence[str], combined_name: str) -> None:
        """Add ``combined_name`` holding the edits of all ``adapters`` (same layers): deltas and edit memories are
        summed, ledgers joined, so the combined adapter can be edited further like any other."""
        if combined_name in self.peft_config:
            raise ValueError(f"An adapter named {combined_name!r} already exists")
        if not adapters:
            raise ValueError("combine_adapters needs at least one adapter")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"No adapter(s) {missing}; have {sorted(self.peft_config)}")
        configs = [self.peft_config[a] for a in adapters]
        if any(c.layers != configs[0].layers or c.base_model_fingerprint != configs[0].base_model_fingerprint
               for c in configs):
            raise ValueError("Only adapters on the same layers of the same base model can be combined")
        self.peft_config[combined_name] = dataclasses.replace(configs[0], inference_mode=True)
        self.inject_adapter(self.model, combined_name)
        states = [self.edit_states[a] for a in adapters]
        combined = self.edit_states[combined_name]
        combined.context_templates = next((s.context_templates for s in states if s.context_templates), None)
        for state in states:
            for layer, moment in state.prev_key_moments.items():
                prev = combined.prev_key_moments.get(layer)
                combined.prev_key_moments[layer] = moment.clone() if prev is None else prev + moment
            combined.num_edits += state.num_edits
            combined.stats_refs.update(state.stats_refs)
        combined.ledger = [{**entry, "source_adapter": name} for name, state in zip(adapters, states)
                           for entry in state.ledger]
        combined.num_batches = len(combined.ledger)
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, Linear) and combined_name in module.encore_delta:
                    module.encore_delta[combined_name].copy_(sum(module.encore_delta[a] for a in adapters))

    @staticmethod
    def _projector(stats: LayerStatistics, threshold: float) -> torch.Tensor:
        if stats.projector is None or stats.projector_threshold != threshold:
            stats.projector = nullspace_projector(stats.c0, threshold)
            stats.projector_threshold = threshold
        return stats.projector
