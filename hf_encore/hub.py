"""Sharing edits: the model card and ``push_to_hub`` on ``huggingface_hub``.

transformers' ``push_to_hub`` (which ``PeftModel`` inherits) would replace the card with a generic one; this pushes
exactly what ``save_pretrained`` writes, with a card that says what was edited.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import EncoreConfig
from .editing.state import EditState

CARD_SAMPLE_ROWS = 10
_CARD_SETTINGS = ("method", "layers", "mpes", "mpes_extra_steps", "preservation_weight", "norm_weight",
                  "nullspace_projection", "nullspace_threshold", "regularizer_scale", "v_lr", "v_num_grad_steps")


def _cell(value: Any) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def model_card(config: EncoreConfig, state: EditState, *, metrics: dict[str, Any] | None = None,
               delta_dtype: torch.dtype | None = None) -> str:
    """The README.md of an adapter: YAML front matter for the Hub, then what was edited and how."""
    base = config.base_model_name_or_path
    tags = ["peft", "hf_encore", "knowledge-editing", config.method]
    lines = ["---", "library_name: peft"]
    if base and base.count("/") == 1 and not Path(base).exists():  # a Hub id, not a local path
        lines.append(f"base_model: {base}")
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    lines += [f"# Knowledge edits ({config.method.upper() if config.method != 'alphaedit' else 'AlphaEdit'})", ""]
    lines.append(f"An `hf_encore` adapter: {state.num_edits} facts written in "
                 f"{state.num_batches} batch(es) into the MLP output projections of layers {config.layers} of "
                 f"`{base}`{' (GGUF file `' + config.gguf_file + '`)' if config.gguf_file else ''}. "
                 f"Deltas stored in {str(delta_dtype or torch.float32).removeprefix('torch.')}.")
    lines += ["", "```python", "import hf_encore", "from transformers import AutoModelForCausalLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({base!r})",
              "model = hf_encore.from_pretrained(base, \"<this repo or directory>\")", "```", ""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(getattr(config, name))} |" for name in _CARD_SETTINGS]
    lines += [f"| base model fingerprint | {config.base_model_fingerprint} |", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in metrics.items()] + [""]
    rows = [(entry["batch"], req, rep) for entry in state.ledger
            for req, rep in zip(entry["requests"], entry["report"]["requests"])]
    if rows:
        lines += [f"## Edits (first {min(len(rows), CARD_SAMPLE_ROWS)} of {len(rows)}; all in encore_ledger.jsonl)",
                  "", "| batch | prompt | new target | p before | p after |", "|---|---|---|---|---|"]
        for batch, req, rep in rows[:CARD_SAMPLE_ROWS]:
            prompt = req["prompt"].replace("{}", req["subject"])
            lines.append(f"| {batch} | {_cell(prompt)} | {_cell(req['target_new'])} | "
                         f"{_cell(rep['p_target_before'])} | {_cell(rep['p_target_after'])} |")
        lines.append("")
    return "\n".join(lines)


def write_model_card(directory: Path, config: EncoreConfig, state: EditState, **kwargs: Any) -> None:
    (Path(directory) / "README.md").write_text(model_card(config, state, **kwargs), encoding="utf-8")


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    include_editing_state: bool = True,
    delta_dtype: str | torch.dtype | None = None,
    metrics: dict[str, Any] | None = None,
    endpoint: str | None = None,
    **save_kwargs: Any,
):
    """Create ``repo_id`` if needed and upload what ``model.save_pretrained`` writes (adapter, editing state, ledger,
    model card) in one commit. Returns huggingface_hub's ``CommitInfo``."""
    from huggingface_hub import HfApi

    from .peft_model import EncorePeftModel

    if not isinstance(model, EncorePeftModel):
        raise TypeError("push_to_hub needs a model from hf_encore.get_encore_model / hf_encore.from_pretrained")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    num_edits = sum(s.num_edits for s in model.base_model.edit_states.values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "adapter")
        model.save_pretrained(folder, save_editing_state=include_editing_state, delta_dtype=delta_dtype,
                              metrics=metrics, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, repo_type="model",
                                 commit_message=commit_message or f"hf_encore: adapter with {num_edits} edits")
