"""The model card (README.md) written beside every saved adapter: YAML front matter for the Hub, the settings, a
sample of the edits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import EncoreConfig
from .editing.state import EditState

CARD_SAMPLE_ROWS = 10


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
    lines += [f"| {name} | {_cell(value)} |" for name, value in
              {"method": config.method, "layers": config.layers, **config.algorithm_settings()}.items()]
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
