"""Where the edited matrices live in each model family: one row per family, nothing model-specific elsewhere.

The editing maths only needs to know

* the list of decoder blocks (``block_path``),
* the MLP output projection W_out inside a block (``mlp_out``), whose *input* is the key and whose output joins the
  residual stream; GPT-2's ``Conv1D`` stores it transposed, which the layer wrapper detects by type,
* the normalisation applied to the MLP output before the residual add, if any (``post_mlp_norm``; Gemma-2/3),
* which layers to edit by default.

Final norm and unembedding are reached through transformers' own ``base_model`` and ``get_output_embeddings()``.
A model that is not in the table but follows a known layout is used by naming ``block_path`` and ``mlp_out`` in
:class:`~hf_encore.EncoreConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ModelLayout:
    block_path: str
    mlp_out: str
    post_mlp_norm: str | None = None
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
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    row = MODEL_LAYOUTS.get(model_type)
    if row is None and (block_path is None or mlp_out is None):
        raise ValueError(
            f"Model type {model_type!r} is not in hf_encore's layout table ({sorted(MODEL_LAYOUTS)}). "
            "Name its decoder blocks and MLP output projection in the config, e.g. "
            "EncoreConfig(block_path='model.layers', mlp_out='mlp.down_proj')."
        )
    if row is None:
        return ModelLayout(block_path, mlp_out)
    return ModelLayout(
        block_path or row.block_path, mlp_out or row.mlp_out, row.post_mlp_norm, row.published_layers
    )


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
    return layers


def target_module_regex(layout: ModelLayout, layers: list[int]) -> str:
    """A PEFT ``target_modules`` regex that matches exactly W_out of the edited layers."""
    block = layout.block_path.replace(".", r"\.")
    out = layout.mlp_out.replace(".", r"\.")
    return rf"(.*\.)?{block}\.({'|'.join(str(x) for x in layers)})\.{out}"
