"""Where the edited matrices live in each model family: one row per family, nothing model-specific elsewhere.

The editing maths only needs to know

* the list of decoder blocks (``block_path``),
* the MLP output projection W_out inside a block (``mlp_out``), whose *input* is the key and whose output joins the
  residual stream; GPT-2's ``Conv1D`` stores it transposed, which the layer wrapper detects by type,
* the normalisation applied to the MLP output before the residual add, if any (``post_mlp_norm``; Gemma-2/3,
  OLMo-2/3),
* the config attribute that scales the logits, if any (``logit_scale``; Cohere),
* settings of a family that break the method's assumptions (``refused_settings``; OPT-350m's post-norm),
* which layers to edit by default.

Families refused by design are in :data:`REFUSED_FAMILIES`, each with the reason. The method writes a fact into one
linear map that every token passes through and whose output is added to the residual stream: a mixture-of-experts
MLP has no such map (see :data:`ROUTED_EXPERTS`).

Final norm and unembedding are reached through transformers' own ``base_model`` and ``get_output_embeddings()``.
A model that is not in the table but follows a known layout is used by naming ``block_path`` and ``mlp_out`` in
:class:`~hf_encore.EncoreConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ModelLayout:
    block_path: str
    mlp_out: str
    post_mlp_norm: str | None = None
    # Config attribute whose value multiplies the logits after the unembedding (Cohere's ``logit_scale``).
    logit_scale: str | None = None
    # (config attribute, refused value, why): a setting of the family that the method cannot handle.
    refused_settings: tuple[tuple[str, object, str], ...] = ()
    # Published edited layers, keyed by the model's number of layers (docs/algorithm.md §6).
    published_layers: dict[int, tuple[int, ...]] = field(default_factory=dict)


_LLAMA_LIKE = ModelLayout("model.layers", "mlp.down_proj", published_layers={32: (4, 5, 6, 7, 8)})

MODEL_LAYOUTS: dict[str, ModelLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": ModelLayout("model.layers", "mlp.down_proj"),
    "qwen2": ModelLayout("model.layers", "mlp.down_proj"),
    "qwen3": ModelLayout("model.layers", "mlp.down_proj"),
    "phi3": ModelLayout("model.layers", "mlp.down_proj"),
    "gemma": ModelLayout("model.layers", "mlp.down_proj"),
    "gemma2": ModelLayout("model.layers", "mlp.down_proj", post_mlp_norm="post_feedforward_layernorm"),
    "gemma3_text": ModelLayout("model.layers", "mlp.down_proj", post_mlp_norm="post_feedforward_layernorm"),
    "gpt2": ModelLayout("transformer.h", "mlp.c_proj", published_layers={48: (13, 14, 15, 16, 17)}),
    "gptj": ModelLayout("transformer.h", "mlp.fc_out", published_layers={28: (3, 4, 5, 6, 7, 8)}),
    "gpt_neox": ModelLayout("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "olmo": ModelLayout("model.layers", "mlp.down_proj"),
    "olmo2": ModelLayout("model.layers", "mlp.down_proj", post_mlp_norm="post_feedforward_layernorm"),
    "olmo3": ModelLayout("model.layers", "mlp.down_proj", post_mlp_norm="post_feedforward_layernorm"),
    "starcoder2": ModelLayout("model.layers", "mlp.c_proj"),
    "falcon": ModelLayout("transformer.h", "mlp.dense_4h_to_h"),
    "opt": ModelLayout("model.decoder.layers", "fc2", refused_settings=(
        ("do_layer_norm_before", False,
         "this OPT (opt-350m) normalises each block's output after the residual add, so a change of W_out's output "
         "does not add to the residual stream as the method's targets assume"),)),
    "phi": ModelLayout("model.layers", "mlp.fc2"),
    "cohere": ModelLayout("model.layers", "mlp.down_proj", logit_scale="logit_scale"),
    "cohere2": ModelLayout("model.layers", "mlp.down_proj", logit_scale="logit_scale"),
}

ROUTED_EXPERTS = (
    "its MLP is a mixture of experts: a token's MLP output is a router-weighted sum of a few experts chosen per "
    "token, and each expert sees only the tokens routed to it. The closed-form edit needs one linear map that every "
    "token goes through (its preservation term is the covariance C₀ of all tokens' keys) and whose output is added to "
    "the residual stream unscaled; with experts, the subject's key reaches only the experts its context routes it "
    "to (a paraphrase may route elsewhere), each with its own C₀ and a router weight. Dense layers of such a model "
    "can be edited by naming them: EncoreConfig(block_path=..., mlp_out=..., layers=[...])")

# Families whose layout the method does not fit, and why (get_encore_model raises with the reason).
REFUSED_FAMILIES: dict[str, str] = {
    family: ROUTED_EXPERTS for family in (
        "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "phimoe", "granitemoe", "granitemoeshared",
        "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "gpt_oss", "llama4_text", "minimax", "ernie4_5_moe",
        "glm4_moe", "hunyuan_v1_moe", "dots1", "bailing_moe", "flex_olmo")
}


def default_layers(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """An early-middle band of ``count`` consecutive layers starting near 12 % depth (the band of the 8B settings)."""
    if num_layers <= 0:
        raise ValueError("a model needs at least one layer to edit")
    count = min(count, num_layers)
    start = min(max(round(0.12 * num_layers), 1 if num_layers > count else 0), num_layers - count)
    return tuple(range(start, start + count))


def resolve_layout(model: nn.Module, block_path: str | None = None, mlp_out: str | None = None) -> ModelLayout:
    """The layout for ``model``: the table row for its ``model_type``, with any names given in the config on top."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED_FAMILIES and (block_path is None or mlp_out is None):
        raise ValueError(f"hf_encore cannot edit a {model_type!r} model: {REFUSED_FAMILIES[model_type]}.")
    row = MODEL_LAYOUTS.get(model_type)
    for attribute, value, why in row.refused_settings if row else ():
        if getattr(config, attribute, None) == value:
            raise ValueError(f"hf_encore cannot edit this {model_type!r} model ({attribute}={value!r}): {why}.")
    if row is None and (block_path is None or mlp_out is None):
        raise ValueError(
            f"Model type {model_type!r} is not in hf_encore's layout table ({sorted(MODEL_LAYOUTS)}). "
            "Name its decoder blocks and MLP output projection in the config, e.g. "
            "EncoreConfig(block_path='model.layers', mlp_out='mlp.down_proj')."
        )
    if row is None:
        return ModelLayout(block_path, mlp_out)
    return ModelLayout(block_path or row.block_path, mlp_out or row.mlp_out, row.post_mlp_norm, row.logit_scale,
                       row.refused_settings, row.published_layers)


def get_blocks(model: nn.Module, layout: ModelLayout) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (not wrapped in PEFT)."""
    try:
        blocks = model.get_submodule(layout.block_path)
    except AttributeError as err:
        raise ValueError(f"The model has no module {layout.block_path!r} (block_path)") from err
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{layout.block_path!r} is a {type(blocks).__name__}, expected the ModuleList of blocks")
    return blocks


def layers_for(model: nn.Module, layout: ModelLayout, layers: list[int] | None) -> list[int]:
    """Validate the requested layers, or choose the published/default ones for this model."""
    num_layers = len(get_blocks(model, layout))
    if layers is None:
        layers = list(layout.published_layers.get(num_layers, default_layers(num_layers)))
    layers = sorted(int(x) for x in layers)
    if not layers or layers[0] < 0 or layers[-1] >= num_layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct indices in [0, {num_layers}), got {layers}")
    for layer in layers:
        check_w_out(model, layout, layer)
    return layers


def check_w_out(model: nn.Module, layout: ModelLayout, layer: int) -> None:
    """Raise one clear ``ValueError`` unless block ``layer`` has a linear W_out at ``layout.mlp_out`` (a
    ``nn.Linear`` or subclass — quantised ones included —, GPT-2's ``Conv1D``, or one already wrapped by
    hf_encore): what would otherwise fail deep inside a forward pass."""
    block = get_blocks(model, layout)[layer]
    where = f"{layout.block_path}.{layer}.{layout.mlp_out}"
    parent_path, _, _ = layout.mlp_out.rpartition(".")
    try:
        module = block.get_submodule(layout.mlp_out)
    except AttributeError:
        try:
            parent = block.get_submodule(parent_path)
        except AttributeError:
            parent = None
        if parent is not None and hasattr(parent, "experts"):
            raise ValueError(f"{where} does not exist ({type(parent).__name__}): {ROUTED_EXPERTS}") from None
        raise ValueError(f"The model has no module {where} (mlp_out)") from None
    # ``base_layer``: already wrapped by hf_encore (or another PEFT tuner), which checks what it wraps. A module with
    # a 2-D ``weight`` but another type may be a quantised linear layer: the wrapper reads it or refuses it by type
    # (``quantized.check_editable``).
    weight = getattr(module, "weight", None)
    linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or hasattr(module, "base_layer") \
        or (isinstance(weight, torch.Tensor) and weight.dim() == 2)
    if not linear:
        raise ValueError(f"{where} is a {type(module).__name__}, not a linear layer: hf_encore edits the weight "
                         f"matrix of the MLP's output projection (name it with mlp_out=...)")


def target_module_regex(layout: ModelLayout, layers: list[int]) -> str:
    """A PEFT ``target_modules`` regex that matches exactly W_out of the edited layers."""
    block = layout.block_path.replace(".", r"\.")
    out = layout.mlp_out.replace(".", r"\.")
    return rf"(.*\.)?{block}\.({'|'.join(str(x) for x in layers)})\.{out}"
