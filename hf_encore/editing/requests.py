"""Edit requests: schema, validation, and tokenisation with subject and target positions.

Positions come from the tokenizer's character offsets where it has them (fast tokenizers), so a BOS token, a
leading-space convention or a subject that merges with the next character cannot shift them silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .prompt_format import PLAIN, PromptFormat


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be continued by ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject)


def _text_field(raw: Mapping[str, Any], name: str, index: int, required: bool = True) -> str | None:
    value = raw.get(name)
    if isinstance(value, Mapping) and "str" in value:  # ROME schema: {"str": "...", "id": ...}
        value = value["str"]
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"request {index}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def parse_requests(requests: Sequence[Mapping[str, Any] | EditRequest]) -> list[EditRequest]:
    """Validate requests before anything changes; a ``ValueError`` names the request and the field."""
    if isinstance(requests, (Mapping, EditRequest)):
        requests = [requests]
    if not isinstance(requests, Sequence) or isinstance(requests, str) or len(requests) == 0:
        raise ValueError("requests must be a non-empty list of {'prompt', 'subject', 'target_new'} mappings")
    parsed = []
    for i, raw in enumerate(requests):
        if isinstance(raw, EditRequest):
            raw = vars(raw)
        if not isinstance(raw, Mapping):
            raise ValueError(f"request {i}: expected a mapping with 'prompt', 'subject', 'target_new', got {raw!r}")
        prompt = _text_field(raw, "prompt", i)
        subject = _text_field(raw, "subject", i)
        target_new = _text_field(raw, "target_new", i)
        target_true = _text_field(raw, "target_true", i, required=False)
        if prompt.count("{}") != 1:
            hint = " (it contains the subject: use prompt.replace(subject, '{}', 1))" if subject in prompt else ""
            raise ValueError(
                f"request {i}: field 'prompt' must contain exactly one '{{}}' placeholder for the subject, "
                f"got {prompt!r}{hint}"
            )
        if prompt.replace("{}", "").count("{") or prompt.replace("{}", "").count("}"):
            raise ValueError(f"request {i}: field 'prompt' has stray braces besides the '{{}}' placeholder")
        parsed.append(EditRequest(prompt, subject, target_new, target_true))
    first: dict[tuple[str, str], int] = {}
    for i, req in enumerate(parsed):
        j = first.setdefault((req.prompt, req.subject), i)
        if parsed[j].target_new != req.target_new:
            # One key cannot be mapped to two values: the solve would average them and write neither.
            raise ValueError(f"requests {j} and {i} ask for different targets ({parsed[j].target_new!r}, "
                             f"{req.target_new!r}) for the same prompt {req.text!r}; keep one")
    return parsed


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids of a prompt and the index of the subject's last token in them."""

    ids: list[int]
    subject_last: int


def tokenize_with_subject(tokenizer, before: str, subject: str, after: str,
                          add_special_tokens: bool = True) -> TokenizedPrompt:
    """Tokenise ``before + subject + after`` (with the tokenizer's special tokens unless ``add_special_tokens`` is
    false: a rendered chat template has its own) and locate the subject's last token.

    Raises ``ValueError`` when no token covers the subject (e.g. a tokenizer that merges it away).
    """
    text = before + subject + after
    start, end = len(before), len(before) + len(subject)
    special = dict(add_special_tokens=add_special_tokens)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, **special)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not hits:
            raise ValueError(f"the subject {subject!r} could not be located in the tokens of {text!r}")
        return TokenizedPrompt(ids, hits[-1])
    ids = list(tokenizer(text, **special)["input_ids"])
    upto = len(tokenizer(before + subject, **special)["input_ids"])
    if upto == 0 or upto > len(ids):
        raise ValueError(f"the subject {subject!r} could not be located in the tokens of {text!r}")
    return TokenizedPrompt(ids, upto - 1)


def split_template(template: str) -> tuple[str, str]:
    """Split a template around its single ``{}``."""
    before, _, after = template.partition("{}")
    return before, after


@dataclass(frozen=True)
class PreparedRequest:
    """A request tokenised in every context template, plus its KL prompt and target ids."""

    prompts: list[TokenizedPrompt]  # one per context template; prompts[0] is the raw "{}" template
    kl_prompt: TokenizedPrompt  # "{subject} is a"
    target_ids: list[int]


KL_PROMPT = "{} is a"


def prepare_requests(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                     form: PromptFormat = PLAIN) -> list[PreparedRequest]:
    """Tokenise each request in each context template, read through ``form`` (the context template's prefix goes
    inside the user turn of a chat form). Raises ``ValueError`` naming the request on failure."""
    prepared = []
    for i, req in enumerate(requests):
        p_before, p_after = split_template(req.prompt)
        try:
            prompts = []
            for template in templates:
                t_before, t_after = split_template(template)
                prompts.append(tokenize_with_subject(tokenizer, form.head + t_before + p_before, req.subject,
                                                     p_after + t_after + form.tail, form.add_special_tokens))
            k_before, k_after = split_template(KL_PROMPT)
            kl = tokenize_with_subject(tokenizer, form.head + k_before, req.subject, k_after + form.tail,
                                       form.add_special_tokens)
            target = form.target_ids(tokenizer, req.target_new)
        except ValueError as err:
            raise ValueError(f"request {i}: {err}") from None
        prepared.append(PreparedRequest(prompts, kl, target))
    return prepared
