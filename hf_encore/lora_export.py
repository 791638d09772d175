"""Export an adapter's deltas as a standard PEFT LoRA adapter, servable by engines that take LoRA (vLLM, TGI,
SGLang multi-LoRA) and loadable by plain PEFT without hf_encore.

A batch of n edits adds an update of rank at most n to each edited W_out, so the delta Δ [d_v, d_k] after N edits
has rank at most N. Its thin SVD Δ = U S Vᵀ gives LoRA factors B = U_r √S_r [d_v, r] and A = √S_r V_rᵀ [r, d_k]
with ``lora_alpha = r`` (PEFT's scaling α/r = 1), so B A = Δ exactly (to float rounding) at the numerical rank, or
the best rank-r approximation (Eckart–Young) when a smaller rank is asked for, with relative error
‖Δ − B A‖_F / ‖Δ‖_F = √(Σ_{i>r} s_i²) / √(Σ s_i²).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .layer import Linear

LORA_WEIGHTS = "adapter_model.safetensors"
EXPORT_REPORT = "hf_encore_lora_export.json"


@dataclass(frozen=True)
class LayerFactors:
    """One edited layer's LoRA factors and what they cost and lose."""

    module: str  # the module's name in the base model (PEFT's target module)
    rank: int  # r of the exported factors
    numerical_rank: int  # rank of Δ at float32 resolution
    relative_error: float  # ‖Δ − B A‖_F / ‖Δ‖_F
    lora_parameters: int  # r·(d_v + d_k)
    dense_parameters: int  # d_v·d_k


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """The number of singular values above s_max · max(d_v, d_k) · ε(float32) (the deltas are float32)."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    tolerance = float(singular_values[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((singular_values > tolerance).sum())


def lora_factors(delta: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A [r, d_k], B [d_v, r], numerical rank, relative error) with B A ≈ ``delta`` [d_v, d_k], float32.

    r is the numerical rank, or ``rank`` when that is smaller (at least 1: a zero delta gives zero factors)."""
    u, s, vh = torch.linalg.svd(delta.detach().double().cpu(), full_matrices=False)
    exact = numerical_rank(s, tuple(delta.shape))
    r = max(1, exact if rank is None else min(rank, exact))
    root = s[:r].sqrt()
    a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    total = float(s.square().sum())
    error = (float(s[r:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return a.float().contiguous(), b.float().contiguous(), exact, error


def _target_prefix(name: str) -> str:
    """``base_model.model.model.layers.4.mlp.down_proj`` → ``model.layers.4.mlp.down_proj``."""
    return name.removeprefix("base_model.model.")


def export_lora(model, directory: str | os.PathLike, *, adapter_name: str = "default",
                rank: int | None = None) -> list[LayerFactors]:
    """Write ``model``'s adapter ``adapter_name`` (an ``EncorePeftModel``) to ``directory`` as a PEFT LoRA adapter
    (``adapter_config.json``, ``adapter_model.safetensors``, a README and ``hf_encore_lora_export.json`` with the
    per-layer report below), at each layer's numerical rank or at most ``rank``; return the per-layer report.

    ``directory`` must not exist or be empty: the files are written beside it and moved into place together, and
    nothing that was there is replaced."""
    from huggingface_hub import ModelCard, ModelCardData
    from peft import LoraConfig
    from safetensors.torch import save_file

    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty directory; export the LoRA adapter to a new "
                              "or empty directory")
    config = model.peft_config[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    report: list[LayerFactors] = []
    transposed = False
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or adapter_name not in module.encore_delta:
            continue
        delta = module.encore_delta[adapter_name]
        a, b, exact, error = lora_factors(delta, rank)
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
        d_v, d_k = delta.shape
        report.append(LayerFactors(_target_prefix(name), a.shape[0], exact, error, a.shape[0] * (d_v + d_k),
                                   d_v * d_k))
        transposed |= type(module.get_base_layer()).__name__ == "Conv1D"
    if not report:
        raise ValueError(f"adapter {adapter_name!r} has no edited layers to export")
    top = max(x.rank for x in report)
    lora = LoraConfig(
        r=top, lora_alpha=top, target_modules=[x.module for x in report], lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", fan_in_fan_out=transposed, base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        # α = r per layer: PEFT scales B A by α/r, so each layer adds exactly B A.
        rank_pattern={x.module: x.rank for x in report if x.rank != top},
        alpha_pattern={x.module: x.rank for x in report if x.rank != top},
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-lora-"))
    try:
        lora.save_pretrained(str(staging))
        save_file(tensors, str(staging / LORA_WEIGHTS), metadata={"format": "pt"})
        (staging / EXPORT_REPORT).write_text(json.dumps(
            {"source": "hf_encore", "method": config.method, "layers": [asdict(x) for x in report]}, indent=2))
        base = config.base_model_name_or_path
        card = ModelCard.from_template(
            ModelCardData(library_name="peft", base_model=base if base and not Path(base).exists() else None,
                          tags=["peft", "lora", "hf_encore", "knowledge-editing"]),
            model_description=f"LoRA export of an hf_encore {config.method} adapter (layers {config.layers}): "
                              f"ranks {[x.rank for x in report]}, largest relative error "
                              f"{max(x.relative_error for x in report):.2e}.")
        card.save(staging / "README.md")
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report
