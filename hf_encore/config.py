"""EncoreConfig: the adapter's configuration, and the method presets (MEMIT, AlphaEdit, ENCORE).

A method is a small set of switches over shared steps (docs/algorithm.md §4):

============  ======  ====================  ==================  ==============
method        MPES    preservation (λ_p)    norm weight (λ_n)   null space (P)
============  ======  ====================  ==================  ==============
memit         off     on                    0                   off
encore        on      on                    > 0                 off
alphaedit     off     0                     α (its ``L2``)      on
============  ======  ====================  ==================  ==============

Any switch can be set explicitly on top of a preset: ``EncoreConfig(method="alphaedit", mpes=True)`` is
"AlphaEdit + MPES"; ``EncoreConfig(method="memit", norm_weight=…)`` is "MEMIT + norm constraint".

Regulariser scale. With ``regularizer_scale="relative"`` (the default) the weights are in units that carry
across models: the absolute λ_p is ``preservation_weight · d_k`` and the absolute λ_n (or α) is
``norm_weight · tr(C₀)``, so that for a typical key k of the statistics corpus kᵀ(λ_p C₀)⁻¹k ≈ 1/preservation_weight
and kᵀ(λ_n I)⁻¹k ≈ 1/norm_weight whatever the model's key magnitudes; the null-space threshold is relative to the
mean eigenvalue tr(C₀)/d_k, and the z-optimisation's step size ``v_lr`` is in units of each request's typical
hidden-state coordinate, median_i |h_i| at the critical layer. With ``regularizer_scale="absolute"`` the numbers
are used as written: the null-space threshold and ``v_lr`` then default to the papers' 2e-2 and 0.5, and the
papers' weights are passed explicitly (ENCORE on Llama3-8B: ``preservation_weight=15000, norm_weight=20``;
AlphaEdit: ``norm_weight=10``), since the presets' weights are in relative units.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from peft.config import PeftConfig

from .editing.prompt_format import PROMPT_FORMATS


class EncorePeftType(str, enum.Enum):
    """PEFT's ``PeftType`` is a closed enum; PEFT's mappings are looked up with the raw string and transformers calls
    ``.value``, so the key is a ``str`` enum member whose name equals its value (see ``registry.py``)."""

    ENCORE = "ENCORE"


METHODS = ("encore", "memit", "alphaedit")

# Defaults for small models, kept by the one-at-a-time sweep of docs/results.md (benchmarks/sweep.py: 100
# counterfact-train edits in two batches on SmolLM2-135M: layers 4–8 and λ_n 0.05 had the best S and kept more
# never-edited facts than the neighbouring settings; v_lr, below, came from the sweep's second round). In these
# units the papers' Llama3-8B λ_p = 15,000 is preservation_weight ≈ 1.05 (d_k = 14,336), MEMIT's preset; the
# published setting on SmolLM2 (λ_p = 15,000 absolute, ≈ 9.8 relative) under-edits (docs/algorithm.md §6).
# ENCORE's λ_p stays 1: the degradation ablation of docs/results.md (benchmarks/degradation_ablation.py, 300
# sequential counterfact-train edits) found that 2 keeps more of the facts the model knew (SmolLM2 0.675 against
# 0.620, Gemma-3-270m 0.680 against 0.610) but costs edits on two of the three models (Gemma: ES 0.83 against 0.93,
# S 0.714 against 0.767; Qwen2.5-0.5B after 100: S 0.773 against 0.809), where on SmolLM2 it cost 0.01. What did
# help on every model without that cost is the larger C₀ (STATS_TOKENS_PER_KEY below): perplexity +4.7 % against
# +7.9 % after 300 edits on Gemma, +5.6 % against +7.8 % on SmolLM2.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "memit": dict(mpes=False, preservation_weight=1.0, norm_weight=0.0, nullspace_projection=False),
    "encore": dict(mpes=True, preservation_weight=1.0, norm_weight=0.05, nullspace_projection=False),
    "alphaedit": dict(mpes=False, preservation_weight=0.0, norm_weight=0.01, nullspace_projection=True),
}

# AlphaEdit's 2e-2 is an absolute eigenvalue of Llama3-8B's C₀, whose spectrum has a real null space. Small models'
# C₀ is full rank (SmolLM2: smallest eigenvalue ≈ 0.1 × median), so the relative default is in units of the mean
# eigenvalue tr(C₀)/d_k.
NULLSPACE_THRESHOLD = {"absolute": 2e-2, "relative": 1.0}

# The papers' lr of 0.5 is absolute. The typical hidden-state coordinate at the critical layer differs between the
# small models (median |h_i|: SmolLM2 ≈ 2.2, Gemma-3-270m ≈ 9.6), so a fixed lr crawls on one or overshoots on
# another; the relative default was chosen by the sweep in docs/results.md (benchmarks/sweep.py, counterfact-train).
V_LR = {"absolute": 0.5, "relative": 0.3}

# C₀'s token budget when stats_n_tokens is None: this many tokens per key dimension d_k, at least MIN_STATS_TOKENS.
# Real text: 40·d_k (61,440 on SmolLM2), chosen by the degradation ablation (docs/results.md): it kept as many known
# facts after 300 edits as 200,000 tokens did (0.620 each, against 0.575 from 10·d_k), at a third of the pass.
# Model-generated text (no corpus given) stays at 10·d_k: sampling costs a forward pass per token (about 3 minutes
# for SmolLM2's 15,360 on a 2-core CPU), and generated text made a slightly worse C₀ than real text of that size.
STATS_TOKENS_PER_KEY = {"corpus": 40, "generated": 10}
MIN_STATS_TOKENS = 10_000


def default_stats_tokens(d_k: int, generated: bool) -> int:
    """Tokens of text C₀ is estimated from when ``stats_n_tokens`` is None, for keys of dimension ``d_k``."""
    return max(MIN_STATS_TOKENS, STATS_TOKENS_PER_KEY["generated" if generated else "corpus"] * d_k)


# ‖W‖/‖W₀‖ of an edited layer above which edit() warns: the lifelong runs in docs/results.md stay below 1.3 with
# ENCORE after 1,000 edits, and the runs that collapsed (plain AlphaEdit on Qwen2.5-0.5B) had passed 2.
NORM_RATIO_WARNING = 2.0

# d_k above which C₀ and S_prev are held in float32 unless moments_dtype says otherwise: in float64 the two take
# 3.3 GB per edited layer at Llama-3-8B's 14,336 (16 GB for five layers), in float32 half that. Below it (every
# model up to ~3B) they stay float64, which keeps resumed runs bit-identical to uninterrupted ones.
LARGE_D_K = 8192

_SWITCHES = ("mpes", "preservation_weight", "norm_weight", "nullspace_projection")

# Settings travel as plain values through the API, `model.edit(**overrides)`, adapter_config.json and the CLI's
# `--set KEY=VALUE`, so a wrong type would otherwise surface as a traceback deep inside an edit (or, for a string
# like "13" given as layers, as a silently different setting). Every setting's kind is checked here, in one place.
INT64_MAX = 2**63 - 1  # counts and seeds end up in torch tensors and generators


@dataclass(frozen=True)
class Setting:
    """The kind of value one setting takes: ``"bool"``, ``"int"`` / ``"float"`` within ``[low, high]`` (``low``
    excluded when ``low_open``), ``"choice"`` of ``choices``, ``"layers"`` (a non-empty list of distinct non-negative
    ints), ``"text"``, ``"text_list"`` (a string or list of strings), ``"text_map"`` (strings to strings);
    ``optional`` also allows ``None``. Bools are not numbers here; ints are accepted where floats are."""

    kind: str
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False

    def requirement(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind in ("int", "float"):
            text = "an integer" if self.kind == "int" else "a finite number"
            if self.low is not None:
                text += f" {'>' if self.low_open else '≥'} {self.low:g}"
            if self.high is not None and self.high != INT64_MAX:  # int64's bound is worth no words of its own
                text += f" and ≤ {self.high:g}" if self.low is not None else f" ≤ {self.high:g}"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "layers":
            text = "a non-empty list of distinct layer indices (integers ≥ 0), e.g. [4, 5, 6]"
        elif self.kind == "text":
            text = "a string"
        elif self.kind == "text_list":
            text = "a string or a list of strings"
        else:
            text = "a mapping of strings to strings"
        return f"None or {text}" if self.optional else text

    def normalise(self, value: Any) -> tuple[bool, Any]:
        """(whether ``value`` is acceptable, the value to keep: numpy scalars become Python numbers so that the config
        stays JSON-serialisable)."""
        if value is None:
            return self.optional, value
        kind = self.kind
        if kind == "bool":
            return isinstance(value, bool), value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                return False, value
            return self._in_range(int(value)), int(value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                return False, value
            try:
                as_float = float(value)
            except (OverflowError, ValueError):  # an int beyond float's range
                return False, value
            kept = value if isinstance(value, (int, float)) else as_float
            return math.isfinite(as_float) and self._in_range(as_float), kept
        if kind == "choice":
            return isinstance(value, str) and value in self.choices, value
        if kind == "layers":
            if not isinstance(value, (list, tuple)) or not value:
                return False, value
            if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0 or x > INT64_MAX
                   for x in value):
                return False, value
            layers = [int(x) for x in value]
            return len(set(layers)) == len(layers), layers
        if kind == "text":
            return isinstance(value, str), value
        if kind == "text_list":
            ok = isinstance(value, str) or (isinstance(value, (list, tuple, set))
                                            and all(isinstance(x, str) for x in value))
            return ok, value
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return ok, value

    def _in_range(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return self.high is None or number <= self.high


def _int(low: int, high: int = INT64_MAX, optional: bool = False) -> Setting:
    return Setting("int", low=low, high=high, optional=optional)


def _float(low: float, low_open: bool = False, optional: bool = False) -> Setting:
    return Setting("float", low=low, low_open=low_open, optional=optional)


# The presets' switches (mpes, preservation_weight, norm_weight, nullspace_projection) and the scale-dependent
# defaults (nullspace_threshold, v_lr) may be given as None; __post_init__ fills them before the check, so the table
# lists the kind of the resolved value.
SETTINGS: dict[str, Setting] = {
    "method": Setting("choice", choices=METHODS),
    "layers": Setting("layers", optional=True),
    "block_path": Setting("text", optional=True),
    "mlp_out": Setting("text", optional=True),
    "mpes": Setting("bool"),
    "mpes_extra_steps": _int(0),
    "mpes_check_raw_prompt": Setting("bool"),
    "preservation_weight": _float(0),
    "norm_weight": _float(0),
    "nullspace_projection": Setting("bool"),
    "nullspace_threshold": _float(0, low_open=True),
    "regularizer_scale": Setting("choice", choices=("relative", "absolute")),
    "map_through_post_norm": Setting("bool"),
    "v_lr": _float(0, low_open=True),
    "v_num_grad_steps": _int(1),
    "clamp_norm_factor": _float(0, low_open=True),
    "v_weight_decay": _float(0),
    "kl_factor": _float(0),
    "n_context_templates": _int(0),
    "context_template_length": _int(1),
    "seed": _int(0),
    "stats_n_tokens": _int(1, optional=True),
    "stats_seq_len": _int(8),
    "max_tokens_per_forward": _int(64),
    "max_norm_ratio": _float(1, low_open=True, optional=True),
    "moments_dtype": Setting("choice", choices=("float64", "float32"), optional=True),
    "moments_device": Setting("choice", choices=("cpu", "layer")),
    "prompt_format": Setting("choice", choices=PROMPT_FORMATS),
    # Set automatically (by get_encore_model, the loaders or PEFT): light type checks only.
    "target_modules": Setting("text_list", optional=True),
    "base_model_fingerprint": Setting("text", optional=True),
    "base_model_parts_fingerprint": Setting("text_map", optional=True),
    "gguf_file": Setting("text", optional=True),
    "base_model_builtin": Setting("text", optional=True),
    "base_model_name_or_path": Setting("text", optional=True),
    "revision": Setting("text", optional=True),
    "inference_mode": Setting("bool"),
}


# Given as None, these take the method's preset (or the regulariser scale's default) when the config is built.
# The settings that decide what an edit writes, as the ledger records them per batch and the model card and
# ``hf-encore show`` list them (the method name and the layers are shown beside them).
ALGORITHM_SETTINGS = ("mpes", "mpes_extra_steps", "preservation_weight", "norm_weight", "nullspace_projection",
                      "nullspace_threshold", "regularizer_scale", "map_through_post_norm", "v_lr", "v_num_grad_steps",
                      "moments_dtype", "prompt_format")

RESOLVED_WHEN_BUILT = frozenset(_SWITCHES + ("nullspace_threshold", "v_lr"))


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to one short line for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_setting(name: str, value: Any) -> Any:
    """``value`` as kept for setting ``name`` (see ``SETTINGS``), or ``ValueError`` naming the setting and what it
    must be. (ValueError also for a wrong type: PEFT's config loader catches TypeError to drop unknown keys.)"""
    setting = SETTINGS[name]
    ok, kept = setting.normalise(value)
    if not ok:
        beyond_int64 = setting.kind == "int" and isinstance(value, int) and abs(value) > INT64_MAX
        raise ValueError(f"EncoreConfig.{name} must be {setting.requirement()}"
                         f"{' (a 64-bit integer)' if beyond_int64 else ''}, got {_shown(value)}")
    return kept


def check_given_setting(name: str, value: Any) -> Any:
    """As :func:`check_setting`, for a value given to the constructor (``None`` also means "the preset's value" for
    the settings in ``RESOLVED_WHEN_BUILT``): lets a caller check settings before building anything."""
    if value is None and name in RESOLVED_WHEN_BUILT:
        return None
    return check_setting(name, value)


@dataclass
class EncoreConfig(PeftConfig):
    """Configuration of an Encore adapter: which MLP output matrices are edited and how.

    Args:
        method: preset of switches, one of ``"encore"`` (default), ``"memit"``, ``"alphaedit"``.
        layers: decoder layers whose MLP output projection is edited; ``None`` takes the published layers for
            the model if known, else an early-middle band of five layers. The last one is the critical layer L.
        block_path: module path of the decoder blocks, for a model family that is not in the layout table.
        mlp_out: name of W_out inside a block, for such a family.
        mpes: Most-Probable Early Stopping of the z-optimisation (ENCORE regulariser 1).
        mpes_extra_steps: the paper's "+k": qualifying iterations required after the first.
        mpes_check_raw_prompt: also require the raw ``"{}"`` prompt to have the target as argmax (the reference
            code does not).
        preservation_weight: λ_p, weight of the preservation term λ_p·tr(ΔW C₀ ΔWᵀ) (see the module docstring).
        norm_weight: λ_n, weight of ENCORE's Frobenius-norm term λ_n‖ΔW‖² (regulariser 2); for AlphaEdit it is α.
        nullspace_projection: project updates onto the null space of C₀ (AlphaEdit).
        nullspace_threshold: eigenvalues of C₀ below this (relative to tr(C₀)/d_k unless absolute) span the null
            space.
        regularizer_scale: ``"relative"`` or ``"absolute"`` units for the three numbers above and ``v_lr``.
        map_through_post_norm: for models that normalise the MLP output before the residual add (Gemma-2/3), map
            each layer's residual target back through that norm; no effect on other models.
        v_lr: learning rate of the z-optimisation (docs/algorithm.md §2); in units of the median |h_i| of the hidden
            state it changes, unless ``regularizer_scale="absolute"``.
        v_num_grad_steps: its step budget.
        clamp_norm_factor: δ is kept within this fraction of the hidden state's norm.
        v_weight_decay: weight decay on δ.
        kl_factor: weight of the KL term that keeps the subject's other predictions.
        n_context_templates: context-prefixed copies of each prompt.
        context_template_length: tokens generated for each context template.
        seed: seed of the context templates.
        stats_n_tokens: tokens of generic text for C₀ (``None``: 40·d_k of a corpus, 10·d_k of model-generated
            text, at least 10,000: ``default_stats_tokens``).
        stats_seq_len: length of the packed text chunks used for statistics.
        max_tokens_per_forward: token budget of one forward pass (bounds memory on long batches).
        max_norm_ratio: refuse (and roll back) a batch after which some edited layer's ‖W‖/‖W₀‖ exceeds this;
            ``None`` (default) only warns when a layer's norm ratio passes ``NORM_RATIO_WARNING``.
        moments_dtype: dtype C₀ and S_prev (the key second moments, [d_k, d_k] per edited layer) are held in
            between edits: ``"float64"``, ``"float32"``, or ``None`` (default): float64 up to d_k =
            ``LARGE_D_K`` and float32 above (1.6 GB → 0.8 GB per matrix at Llama-3-8B's d_k = 14,336). The
            solve is float64 either way; float32 rounds S_prev after each batch (effect measured in
            docs/results.md).
        moments_device: where they are held and each layer's update is solved: ``"cpu"`` (default: host memory)
            or ``"layer"`` (the edited layer's execution device: a GPU's float64 solve is much faster, and C₀ and
            S_prev then take GPU memory).
        prompt_format: how each request's prompt reaches the model while it is edited: ``"plain"`` (default) text
            that the target continues, or ``"chat"``: the user turn of the tokenizer's chat template with the
            generation prompt, the target starting the assistant's reply (context-template prefixes go inside
            the user turn; the subject is located inside it). See docs/howto/chat-models.md.
    """

    method: str = field(default="encore", metadata={"help": "one of 'encore', 'memit', 'alphaedit'"})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "edited decoder layers"})
    block_path: Optional[str] = field(default=None, metadata={"help": "module path of the decoder blocks"})
    mlp_out: Optional[str] = field(default=None, metadata={"help": "name of W_out inside a block"})

    mpes: Optional[bool] = None
    mpes_extra_steps: int = 2
    mpes_check_raw_prompt: bool = False
    preservation_weight: Optional[float] = None
    norm_weight: Optional[float] = None
    nullspace_projection: Optional[bool] = None
    nullspace_threshold: Optional[float] = None
    regularizer_scale: Literal["relative", "absolute"] = "relative"
    map_through_post_norm: bool = True

    v_lr: Optional[float] = None
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625

    n_context_templates: int = 5
    context_template_length: int = 10
    seed: int = 0

    stats_n_tokens: Optional[int] = None
    stats_seq_len: int = 256
    max_tokens_per_forward: int = 4096
    max_norm_ratio: Optional[float] = None
    moments_dtype: Optional[Literal["float64", "float32"]] = None
    moments_device: Literal["cpu", "layer"] = "cpu"
    prompt_format: Literal["plain", "chat"] = "plain"

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "set automatically"})
    base_model_fingerprint: Optional[str] = field(default=None, metadata={"help": "set automatically"})
    base_model_parts_fingerprint: Optional[dict[str, str]] = field(
        default=None, metadata={"help": "set automatically: a sampled fingerprint of every part of the base model"})
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file the base was loaded from"})
    base_model_builtin: Optional[str] = field(
        default=None, metadata={"help": "set automatically: the hf_encore built-in model the base was loaded as (its "
                                        "GGUF copy of base_model_name_or_path), which loads the same weights anywhere"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = EncorePeftType.ENCORE
        # The two choices select the presets below, so they are checked before they are used as keys.
        if not (isinstance(self.method, str) and self.method in METHODS):
            raise ValueError(f"Unknown method {_shown(self.method)}; EncoreConfig.method must be one of "
                             f"{', '.join(map(repr, METHODS))}")
        check_setting("regularizer_scale", self.regularizer_scale)
        for name, value in METHOD_PRESETS[self.method].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.nullspace_threshold is None:
            self.nullspace_threshold = NULLSPACE_THRESHOLD[self.regularizer_scale]
        if self.v_lr is None:
            self.v_lr = V_LR[self.regularizer_scale]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is not of its kind (``SETTINGS``) or out of range."""
        for name in SETTINGS:
            setattr(self, name, check_setting(name, getattr(self, name)))
        if not self.nullspace_projection and self.preservation_weight == 0 and self.norm_weight == 0:
            raise ValueError("With preservation_weight = norm_weight = 0 and no null-space projection the update "
                             "is unregularised; set one of them")
        if self.nullspace_projection and self.norm_weight == 0:
            # P (Λ + K Kᵀ) P is zero on the directions P projects away: only the ridge ρ makes the system solvable.
            raise ValueError("nullspace_projection=True needs norm_weight > 0 (AlphaEdit's α): without it the "
                             "projected system has no solution")

    def moments_storage_dtype(self, d_k: int) -> torch.dtype:
        """The dtype C₀ and S_prev of a layer with keys of dimension ``d_k`` are held in (``moments_dtype``)."""
        name = self.moments_dtype or ("float64" if d_k <= LARGE_D_K else "float32")
        return getattr(torch, name)

    def algorithm_settings(self) -> dict[str, Any]:
        """The values of ``ALGORITHM_SETTINGS``: what the ledger, the model card and ``hf-encore show`` report."""
        return {name: getattr(self, name) for name in ALGORITHM_SETTINGS}

    def with_overrides(self, **overrides: Any) -> "EncoreConfig":
        """A copy with some settings changed (as ``model.edit(requests, **overrides)`` takes them).

        Changing ``method`` re-applies that method's preset to every switch not named in ``overrides``.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"Unknown EncoreConfig setting(s): {unknown}")
        frozen = {"layers", "block_path", "mlp_out", "target_modules", "base_model_fingerprint",
                  "base_model_parts_fingerprint", "base_model_builtin"}
        if frozen & set(overrides):
            raise ValueError(f"{sorted(frozen & set(overrides))} are fixed when the adapter is created")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if "method" in overrides:
            for name in _SWITCHES:
                values[name] = None
        if "method" in overrides or "regularizer_scale" in overrides:
            values["nullspace_threshold"] = values["v_lr"] = None
        values.update(overrides)
        return EncoreConfig(**values)
