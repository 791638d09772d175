"""Sharing edits: ``push_to_hub`` on ``huggingface_hub``.

transformers' ``push_to_hub`` (which ``PeftModel`` inherits) would replace the card with a generic one; this pushes
exactly what ``save_pretrained`` writes, with a card that says what was edited.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from typing import Any

import torch

from .model import EncoreModel

DEFAULT_TIMEOUT = 60.0  # seconds to wait for the Hub's answer to one request (huggingface_hub's own default: forever)
# Files save_pretrained writes for its own bookkeeping (the save lock) that are not part of the adapter.
NOT_UPLOADED = [".encore*", "**/.encore*"]


class HubConnectionError(ConnectionError):
    """The Hub endpoint could not be reached or did not answer in time (an ``OSError``; the message names it)."""
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

    if not isinstance(getattr(model, "base_model", None), EncoreModel):
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
