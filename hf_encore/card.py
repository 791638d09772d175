"""The model card (README.md) written beside every saved adapter: Hub metadata through huggingface_hub's
``ModelCardData`` (base model, relation, library, pipeline, licence, datasets, evaluation results), then the settings,
a snippet that loads the adapter and a sample of the edits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .config import EncoreConfig
from .editing.state import EditState

CARD_SAMPLE_ROWS = 10


def _cell(value: Any) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not Path(name).exists()


def card_data(config: EncoreConfig, *, metrics: Mapping[str, float] | None = None,
              extra: Mapping[str, Any] | None = None):
    """The card's metadata: ``base_model`` (a Hub id, never a local path) with ``base_model_relation: adapter``,
    ``library_name: peft``, ``pipeline_tag: text-generation``, tags, the base's licence where hf_encore knows it (its
    built-in models), ``metrics`` as evaluation results, and ``extra`` fields (``datasets``, ``license``, …) on top."""
    from huggingface_hub import EvalResult, ModelCardData

    from .loading import resolve_builtin

    base = config.base_model_name_or_path
    builtin = resolve_builtin(config.base_model_builtin) if config.base_model_builtin else None
    fields: dict[str, Any] = {
        "library_name": "peft", "pipeline_tag": "text-generation",
        "tags": ["peft", "hf_encore", "knowledge-editing", config.method],
        "base_model": base if _is_hub_id(base) else None,
        "base_model_relation": "adapter" if _is_hub_id(base) else None,
        "license": builtin.license if builtin else None,
    }
    if metrics:
        fields["model_name"] = f"{config.method} edits of {base}"
        fields["eval_results"] = [
            EvalResult(task_type="text-generation", dataset_type="knowledge-editing", dataset_name="edited facts",
                       metric_type=str(name), metric_value=float(value)) for name, value in metrics.items()]
    fields.update(extra or {})
    return ModelCardData(**{k: v for k, v in fields.items() if v is not None})


def _snippet(config: EncoreConfig) -> list[str]:
    """Python that loads the base and this adapter."""
    base, gguf = config.base_model_name_or_path, config.gguf_file
    if config.base_model_builtin:
        load = [f"base, tokenizer = hf_encore.load_model({config.base_model_builtin!r})  # the {gguf} copy of {base}"]
    elif gguf:
        load = ["from transformers import AutoModelForCausalLM", "",
                f"base = AutoModelForCausalLM.from_pretrained({base!r}, gguf_file={gguf!r})"]
    else:
        load = ["from transformers import AutoModelForCausalLM", "",
                f"base = AutoModelForCausalLM.from_pretrained({base!r})"]
    attach = 'model = hf_encore.from_pretrained(base, "<this repo or directory>")'
    return ["```python", "import hf_encore", *load, attach, "```", ""]


def model_card(config: EncoreConfig, state: EditState, *, metrics: dict[str, Any] | None = None,
               delta_dtype: torch.dtype | None = None, extra_metadata: Mapping[str, Any] | None = None) -> str:
    """The README.md of an adapter: Hub metadata (:func:`card_data`), then what was edited and how."""
    base = config.base_model_name_or_path
    data = card_data(config, metrics=metrics, extra=extra_metadata)
    lines = ["---", data.to_yaml(), "---", ""]
    lines += [f"# Knowledge edits ({config.method.upper() if config.method != 'alphaedit' else 'AlphaEdit'})", ""]
    source = f" (GGUF file `{config.gguf_file}`)" if config.gguf_file else ""
    if config.base_model_builtin:
        source += f", loaded as hf_encore's built-in `{config.base_model_builtin}`"
    lines.append(f"An `hf_encore` adapter: {state.num_edits} facts written in "
                 f"{state.num_batches} batch(es) into the MLP output projections of layers {config.layers} of "
                 f"`{base}`{source}. Deltas stored in {str(delta_dtype or torch.float32).removeprefix('torch.')}.")
    lines += ["", *_snippet(config)]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in
              {"method": config.method, "layers": config.layers, **config.algorithm_settings()}.items()]
    lines += [f"| base model fingerprint | {config.base_model_fingerprint} |", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in metrics.items()] + [""]
    if state.ledger:
        requests = sum(len(entry["requests"]) for entry in state.ledger)
        raised = sum(rep["p_target_after"] > rep["p_target_before"] for entry in state.ledger
                     for rep in entry["report"]["requests"])
        lines += ["## Ledger", "", f"{len(state.ledger)} batch(es), {requests} requests; p(target) rose for {raised} "
                  f"of them (all in encore_ledger.jsonl).", ""]
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
