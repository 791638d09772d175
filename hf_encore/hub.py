"""Sharing edits: the model card and ``push_to_hub`` on ``huggingface_hub``.

transformers' ``push_to_hub`` (which ``PeftModel`` inherits) would replace the card with a generic one; this pushes
exactly what ``save_pretrained`` writes, with a card that says what was edited.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import EncoreConfig
from .editing.state import EditState

CARD_SAMPLE_ROWS = 10
DEFAULT_TIMEOUT = 60.0  # seconds to wait for the Hub's answer to one request (huggingface_hub's own default: forever)
# Files save_pretrained writes for its own bookkeeping (the save lock) that are not part of the adapter.
NOT_UPLOADED = [".encore*", "**/.encore*"]


class HubConnectionError(ConnectionError):
    """The Hub endpoint could not be reached or did not answer in time (an ``OSError``; the message names it)."""
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


@contextlib.contextmanager
def hub_timeout(seconds: float):
    """Within the block, huggingface_hub's shared HTTP client waits at most ``seconds`` to connect and for each read
    or write. huggingface_hub's client has no timeout (a silent endpoint hangs for ever); its documented way to
    configure the client is ``set_client_factory``. The factory in place before (a user's proxy settings, say) still
    builds the client; the timeout is set on what it returns, and that factory is restored afterwards."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def factory():
        client = previous()
        client.timeout = seconds
        return client

    set_client_factory(factory)  # also closes the current client, so that the next request uses the factory
    try:
        yield
    finally:
        set_client_factory(previous)


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
    timeout: float | None = DEFAULT_TIMEOUT,
    **save_kwargs: Any,
):
    """Create ``repo_id`` if needed and upload what ``model.save_pretrained`` writes (adapter, editing state, ledger,
    model card) in one commit. Returns huggingface_hub's ``CommitInfo``.

    ``timeout``: seconds to wait for the Hub to accept a connection or answer a request (``None``: wait for ever).
    An unreachable or silent endpoint raises :class:`HubConnectionError` naming it (huggingface_hub retries some
    requests a few times first); the Hub's refusals (bad token, no such revision) raise huggingface_hub's
    ``HfHubHTTPError``.
    """
    import httpx2
    from huggingface_hub import HfApi, constants

    from .peft_model import EncorePeftModel

    if not isinstance(model, EncorePeftModel):
        raise TypeError("push_to_hub needs a model from hf_encore.get_encore_model / hf_encore.from_pretrained")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    api = HfApi(endpoint=endpoint, token=token)
    where = endpoint or constants.ENDPOINT
    num_edits = sum(s.num_edits for s in model.base_model.edit_states.values())
    with hub_timeout(timeout) if timeout is not None else contextlib.nullcontext():
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            with tempfile.TemporaryDirectory() as tmp:
                folder = os.path.join(tmp, "adapter")
                model.save_pretrained(folder, save_editing_state=include_editing_state, delta_dtype=delta_dtype,
                                      metrics=metrics, **save_kwargs)
                return api.upload_folder(
                    repo_id=repo_id, folder_path=folder, revision=revision, repo_type="model",
                    ignore_patterns=NOT_UPLOADED,
                    commit_message=commit_message or f"hf_encore: adapter with {num_edits} edits")
        except httpx2.TimeoutException as err:
            within = f" within {timeout:g} s" if timeout is not None else ""
            raise HubConnectionError(f"{where} did not answer{within} ({type(err).__name__}); check the endpoint "
                                     "and the network, or allow a slow Hub a longer timeout") from err
        except httpx2.TransportError as err:
            raise HubConnectionError(f"cannot reach {where} ({type(err).__name__}: {err})") from err
