"""An entry point shaped like EasyEdit's ``BaseEditor.edit``, so that its users switch with a one-line change.

EasyEdit takes prompts with the subject inline and parallel lists (``prompts``, ``target_new``, ``subject``,
``ground_truth``, ``rephrase_prompts``, ``locality_inputs``) and returns one metrics record per request with the
teacher-forced accuracies before (``pre``) and after (``post``) the edits. :func:`edit_facts` takes the same
arguments, writes the facts with hf_encore (sequentially, each batch remembering the earlier ones) and returns
records of the same shape.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from .editing.prompt_format import prompt_format


def _as_list(value: Any, n: int, name: str) -> list[Any] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
    return values


def requests_from_inline(prompts: Sequence[str], target_new: Sequence[str], subject: Sequence[str],
                         ground_truth: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """hf_encore requests from prompts that contain their subject: the subject's first occurrence becomes ``{}``.
    Raises ``ValueError`` naming the request whose prompt does not contain its subject."""
    requests = []
    for i, (prompt, target, subj) in enumerate(zip(prompts, target_new, subject)):
        if "{}" in prompt:
            template = prompt
        elif subj in prompt:
            template = prompt.replace(subj, "{}", 1)
        else:
            raise ValueError(f"request {i}: the subject {subj!r} does not occur in the prompt {prompt!r}")
        request = {"prompt": template, "subject": subj, "target_new": target}
        if ground_truth is not None and ground_truth[i] is not None:
            request["target_true"] = ground_truth[i]
        requests.append(request)
    return requests


def _accuracies(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], form) -> list[float]:
    scores = _scores(model, tokenizer, prompts, answers, form)
    return [float(c.float().mean()) for c in scores.token_correct]


def _scores(model, tokenizer, prompts, answers, form):
    from .evaluation import score_continuations

    with torch.no_grad():
        return score_continuations(model, tokenizer, list(prompts), list(answers), form=form)


def edit_facts(
    model: Any,
    prompts: str | Sequence[str],
    target_new: str | Sequence[str],
    subject: str | Sequence[str],
    ground_truth: str | Sequence[str] | None = None,
    rephrase_prompts: str | Sequence[str] | None = None,
    locality_inputs: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    *,
    tokenizer: Any = None,
    corpus: Any = None,
    batch_size: int = 1,
    progress: bool = True,
    **overrides: Any,
) -> tuple[list[dict[str, Any]], Any]:
    """Write facts given as EasyEdit does, and return ``(metrics, model)`` as its ``editor.edit`` returns
    ``(metrics, edited_model, weights_copy)``.

    Args:
        model: an ``EncorePeftModel`` (its adapter keeps the edits and their memory), or a transformers causal LM,
            which is wrapped as ``get_encore_model(model, EncoreConfig(), tokenizer=tokenizer, corpus=corpus)``
            would (without ``corpus``, C₀ comes from text the model generates, with a warning).
        prompts: the prompts, each containing its subject (``"LeBron James plays the sport of"``); a prompt with a
            ``{}`` placeholder is taken as it is.
        target_new: the new answer of each prompt.
        subject: the subject inside each prompt.
        ground_truth: the current answers (recorded as ``target_true``), optional.
        rephrase_prompts: one paraphrase per prompt, for ``rephrase_acc``.
        locality_inputs: ``{name: {"prompt": [...], "ground_truth": [...]}}``, one prompt per request, for
            ``locality[name + "_acc"]``: the fraction of the ground truth's tokens whose argmax is unchanged by the
            edits, as EasyEdit computes it.
        tokenizer: the model's tokenizer, if the adapter has none yet.
        corpus: the statistics text, if the adapter has none yet (as for ``get_encore_model``).
        batch_size: requests per ``edit()`` call; the batches are edited in order, each remembering the earlier ones.
        progress: progress bars.
        overrides: any ``EncoreConfig`` setting for these edits (e.g. ``prompt_format="chat"``).

    Returns:
        One record per request — ``case_id``, ``requested_rewrite``, ``time`` (seconds of its batch), ``pre`` and
        ``post`` with ``rewrite_acc`` and, where given, ``rephrase_acc`` (teacher-forced token accuracy of
        ``target_new``, a one-element list as in EasyEdit), ``locality`` and ``portability`` (empty) — measured after
        all the edits, and the edited model.
    """
    from .config import EncoreConfig
    from .peft_model import EncorePeftModel

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    target_new = _as_list(target_new, n, "target_new")
    subject = _as_list(subject, n, "subject")
    ground_truth = _as_list(ground_truth, n, "ground_truth")
    rephrase_prompts = _as_list(rephrase_prompts, n, "rephrase_prompts")
    locality = {name: (_as_list(spec["prompt"], n, f"locality_inputs[{name!r}]['prompt']"),
                       _as_list(spec["ground_truth"], n, f"locality_inputs[{name!r}]['ground_truth']"))
                for name, spec in (locality_inputs or {}).items()}
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    requests = requests_from_inline(prompts, target_new, subject, ground_truth)
    if not isinstance(model, EncorePeftModel):
        model = EncorePeftModel(model, EncoreConfig())
    model.base_model.set_editing_inputs(tokenizer, corpus)
    tokenizer = model.base_model._get_tokenizer(tokenizer)
    config = model.peft_config[model.active_adapter].with_overrides(**overrides)
    form = prompt_format(tokenizer, config.prompt_format)
    texts = [r["prompt"].replace("{}", r["subject"]) for r in requests]

    def measure() -> tuple[list[dict[str, Any]], dict[str, list[torch.Tensor]]]:
        records = [{"rewrite_acc": [acc], "portability": {}, "locality": {}}
                   for acc in _accuracies(model, tokenizer, texts, target_new, form)]
        if rephrase_prompts is not None:
            for record, acc in zip(records, _accuracies(model, tokenizer, rephrase_prompts, target_new, form)):
                record["rephrase_acc"] = [acc]
        predictions = {name: _scores(model, tokenizer, loc_prompts, answers, form).token_predictions
                       for name, (loc_prompts, answers) in locality.items()}
        return records, predictions

    pre, pre_predictions = measure()
    seconds = [0.0] * n
    for start in range(0, n, batch_size):
        tick = time.perf_counter()
        model.edit(requests[start: start + batch_size], tokenizer=tokenizer, progress=progress, **overrides)
        seconds[start: start + batch_size] = [time.perf_counter() - tick] * len(requests[start: start + batch_size])
    post, post_predictions = measure()
    for name in locality:
        for i, record in enumerate(post):
            same = (post_predictions[name][i] == pre_predictions[name][i]).float().mean()
            record["locality"][f"{name}_acc"] = [float(same)]
    metrics = []
    for i, request in enumerate(requests):
        rewrite = {"prompt": prompts[i], "target_new": target_new[i], "ground_truth": request.get("target_true"),
                   "subject": subject[i], "rephrase_prompt": rephrase_prompts[i] if rephrase_prompts else None,
                   "locality": {name: {"prompt": p[i], "ground_truth": a[i]} for name, (p, a) in locality.items()},
                   "portability": {}}
        metrics.append({"case_id": i, "requested_rewrite": rewrite, "time": seconds[i], "pre": pre[i],
                        "post": post[i]})
    return metrics, model
