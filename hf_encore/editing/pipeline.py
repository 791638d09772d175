"""One batch of edits, from requests to updated deltas (docs/algorithm.md §2–5): the orchestration of the steps.

    context templates (once per adapter) → C₀ per layer → z for every request at the critical layer L
    → for each edited layer l (low → high): K_l, H on the current model; R = (Z − H)/(layers left);
      ΔW_l = layer_update(...); add ΔW_l to the adapter's delta (the next layer sees it)
    → check the norm growth, p(target) after, then commit S_prev += K Kᵀ, counters, ledger

``edit_batch`` changes the deltas and the ``EditState`` it is given and leaves the rollback to its caller
(``EncoreModel.edit``). The four steps that read the model are passed in as an :class:`EditSteps`, so that the
straightforward reference implementation (``editing/reference.py``) runs through the same pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch

from ..config import NORM_RATIO_WARNING, EncoreConfig
from .keys import key_pass_inputs, keys_and_outputs
from .prompt_format import prompt_format
from .report import EditReport, LayerReport, RequestReport
from .requests import EditRequest, prepare_requests
from .solve import SolveSettings, layer_residual, layer_update, pre_norm_residual
from .state import EditState, LayerStatistics
from .stats import second_moments
from .targets import TargetSettings, optimise_targets, target_probabilities
from .templates import generate_context_templates
from .tracing import ModelAccess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditSteps:
    """The steps that read the model, each a function with the signature of the optimised one named here.

    ``optimise_targets``: z at the critical layer (``targets.optimise_targets``); ``key_pass_inputs`` and
    ``keys_and_outputs``: K and H per layer (``keys``); ``second_moments``: C₀ (``stats.second_moments``).
    """

    optimise_targets: Callable = optimise_targets
    key_pass_inputs: Callable = key_pass_inputs
    keys_and_outputs: Callable = keys_and_outputs
    second_moments: Callable = second_moments


FAST_STEPS = EditSteps()


class NormRatioExceededError(ValueError):
    """A batch would have grown an edited layer's ‖W‖/‖W₀‖ past ``max_norm_ratio`` (the batch is rolled back)."""


def likely_norm_cause(config: EncoreConfig, num_edits: int) -> str:
    """The settings most likely behind an unusually large update: those set more aggressively than the method's
    defaults, else the accumulated edits themselves."""
    preset = EncoreConfig(method=config.method, regularizer_scale=config.regularizer_scale)
    weaker = [f"{name}={getattr(config, name)!r} (default {getattr(preset, name)!r})"
              for name in ("preservation_weight", "norm_weight") if getattr(config, name) < getattr(preset, name)]
    stronger = [f"{name}={getattr(config, name)!r} (default {getattr(preset, name)!r})"
                for name in ("v_lr", "clamp_norm_factor", "v_num_grad_steps")
                if getattr(config, name) > getattr(preset, name)]
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


def target_settings(config: EncoreConfig) -> TargetSettings:
    """The z-optimisation's settings (docs/algorithm.md §2–3) from an adapter's config."""
    return TargetSettings(
        lr=config.v_lr, lr_relative=config.regularizer_scale == "relative", num_steps=config.v_num_grad_steps,
        clamp_norm_factor=config.clamp_norm_factor, weight_decay=config.v_weight_decay, kl_factor=config.kl_factor,
        mpes=config.mpes, mpes_extra_steps=config.mpes_extra_steps, mpes_check_raw_prompt=config.mpes_check_raw_prompt,
        max_tokens_per_forward=config.max_tokens_per_forward)


def solve_settings(config: EncoreConfig) -> SolveSettings:
    """The closed form's switches (docs/algorithm.md §4) from an adapter's config."""
    return SolveSettings(config.preservation_weight, config.norm_weight, config.nullspace_projection,
                         config.nullspace_threshold, config.regularizer_scale == "relative")


def weight_norm_ratio(module: torch.nn.Module, delta: torch.Tensor) -> float:
    """‖W₀ + Δ‖_F / ‖W₀‖_F of a wrapped W_out (``layer.Linear``), from its real original weight (dequantised,
    onloaded), in float64; nothing of that size outlives the call."""
    base_weight = module.float_original_weight().double()
    w0_norm = float(base_weight.norm())
    return float(base_weight.add_(delta.to(base_weight.device, torch.float64)).norm()) / w0_norm


def edit_batch(
    access: ModelAccess,
    edited: Mapping[int, torch.nn.Module],
    adapter: str,
    config: EncoreConfig,
    state: EditState,
    requests: list[EditRequest],
    tokenizer: Any,
    statistics: Callable[[], dict[int, LayerStatistics]],
    *,
    unedited: Callable[[], ContextManager],
    steps: EditSteps = FAST_STEPS,
    progress: bool = True,
) -> EditReport:
    """Write ``requests`` into the adapter's deltas and commit them to ``state``; return the report.

    Args:
        access: the model, read through ``editing/tracing.py``.
        edited: the wrapped W_out (``layer.Linear``) of each edited layer, by layer; its
            ``encore_delta[adapter]`` [d_v, d_k] is updated in place.
        adapter: the name of the adapter being edited.
        config: its settings, with this call's overrides.
        state: the adapter's editing state (templates, S_prev, counters, ledger), updated in place.
        requests: the validated requests.
        tokenizer: the model's tokenizer (with a pad token).
        statistics: returns C₀ per edited layer (called once, after the templates).
        unedited: a context in which the model is its unedited base (for the context templates).
        steps: the model-reading steps.
        progress: show progress bars.

    Returns:
        The report: per request steps, MPES stops and p(target) before and after; per layer ‖ΔW‖ and ‖W‖/‖W₀‖;
        seconds per stage.

    Raises anything a step raises, after which the deltas and ``state`` may be half-changed: the caller restores
    them.
    """
    seconds: dict[str, float] = {}
    pad_id = tokenizer.pad_token_id
    budget = config.max_tokens_per_forward

    tick = time.perf_counter()
    if state.context_templates is None:
        with unedited():
            state.context_templates = generate_context_templates(
                access.lm, tokenizer, count=config.n_context_templates,
                length=config.context_template_length, seed=config.seed)
    prepared = prepare_requests(tokenizer, requests, state.context_templates,
                                prompt_format(tokenizer, config.prompt_format))
    seconds["templates"] = time.perf_counter() - tick

    tick = time.perf_counter()
    stats = statistics()
    seconds["statistics"] = time.perf_counter() - tick

    tick = time.perf_counter()
    critical = config.layers[-1]
    targets = steps.optimise_targets(access, prepared, critical, target_settings(config), pad_id, progress)
    if not torch.isfinite(targets.z).all():
        raise FloatingPointError("non-finite target hidden states")
    seconds["targets"] = time.perf_counter() - tick

    seconds["keys"] = seconds["solve"] = 0.0
    z = targets.z.double().T  # [d_v, n]
    solve = solve_settings(config)
    new_moments: dict[int, torch.Tensor] = {}
    layer_reports = []
    with torch.no_grad():
        tick = time.perf_counter()
        key_inputs = steps.key_pass_inputs(access, prepared, min(config.layers), pad_id, budget)
        seconds["keys"] += time.perf_counter() - tick
        for i, layer in enumerate(config.layers):
            tick = time.perf_counter()
            keys, raw_keys, outputs = steps.keys_and_outputs(access, key_inputs, layer, critical)
            seconds["keys"] += time.perf_counter() - tick
            tick = time.perf_counter()
            residual = layer_residual(z, outputs, len(config.layers) - i)
            if config.map_through_post_norm and access.post_mlp_norm(layer) is not None:
                mlp_out, normalised, gain = access.mlp_output_through_norm(layer, raw_keys)
                residual = pre_norm_residual(mlp_out, normalised, residual, gain)
            prev = state.prev_key_moments.get(layer)
            held = stats[layer].c0  # where this layer is solved and its moments held (moments_device)
            keys = keys.to(held.device)  # once, for the solve and S_prev
            try:
                update = layer_update(keys, residual, stats[layer], prev, solve)
            except torch.linalg.LinAlgError as err:
                raise ValueError(
                    f"layer {layer}: the update is not determined: C₀ (from {stats[layer].n_tokens} tokens) leaves "
                    f"key directions that preservation_weight={config.preservation_weight} and norm_weight="
                    f"{config.norm_weight} do not regularise; use a larger statistics corpus or a positive "
                    f"norm_weight ({err})") from err
            if not torch.isfinite(update).all():
                raise FloatingPointError(f"non-finite update at layer {layer}")
            module = edited[layer]
            delta = module.encore_delta[adapter]
            delta.add_(update.to(delta.dtype, copy=False).to(delta.device))
            update_norm = float(update.norm())
            del update  # [d_v, d_k] float64: 0.5 GB at 8B, not kept while the next layer is solved
            # S_prev += K Kᵀ, summed in float64 and held as C₀ is (EncoreConfig.moments_dtype / moments_device).
            new_moments[layer] = (torch.addmm(prev.to(held.device, torch.float64), keys, keys.T) if prev is not None
                                  else keys @ keys.T).to(held.dtype)
            layer_reports.append(LayerReport(layer, update_norm, weight_norm_ratio(module, delta)))
            seconds["solve"] += time.perf_counter() - tick

    check_norm_growth(layer_reports, config, state.num_edits + len(requests))
    p_after = target_probabilities(access, prepared, pad_id, budget)
    state.prev_key_moments.update(new_moments)
    state.num_edits += len(requests)
    state.num_batches += 1
    request_reports = [
        RequestReport(r.prompt, r.subject, r.target_new, targets.steps[i], targets.mpes_stopped[i],
                      targets.p_target_before[i], float(p_after[i]), targets.final_loss[i])
        for i, r in enumerate(requests)
    ]
    report = EditReport(config.method, adapter, request_reports, layer_reports, seconds)
    state.ledger.append({
        "batch": state.num_batches, "time": time.time(), "method": config.method,
        "settings": config.algorithm_settings(),
        "requests": [vars(r) for r in requests],
        "report": {"requests": [vars(r) for r in request_reports], "layers": [vars(x) for x in layer_reports]},
    })
    return report
