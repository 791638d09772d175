"""How a request's prompt reaches the model: as plain text that the target continues, or as the user turn of the
tokenizer's chat template, the target being the start of the assistant's reply (``EncoreConfig.prompt_format``).

Editing (the z-optimisation, keys, p(target)) and evaluation read prompts through the same :class:`PromptFormat`,
so an edit made through one form can be asked through either.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_FORMATS = ("plain", "chat")
# Stands for the user's text while the chat template is rendered; split out again around it.
_USER_TEXT = "HFENCOREUSERTEXT"


@dataclass(frozen=True)
class PromptFormat:
    """``head + text + tail`` is what the model reads for a prompt ``text``: empty for ``"plain"``; for ``"chat"``
    the chat template's text before the user's message, and after it up to the assistant's generation prompt."""

    name: str = "plain"
    head: str = ""
    tail: str = ""

    @property
    def chat(self) -> bool:
        return self.name == "chat"

    @property
    def add_special_tokens(self) -> bool:
        """Plain text gets the tokenizer's own special tokens (BOS); a rendered chat template has its own."""
        return not self.chat

    def wrap(self, text: str) -> str:
        return self.head + text + self.tail

    def encode(self, tokenizer, text: str) -> list[int]:
        """Token ids of ``text`` as the model reads it in this form."""
        return list(tokenizer(self.wrap(text), add_special_tokens=self.add_special_tokens)["input_ids"])

    def target_ids(self, tokenizer, target: str) -> list[int]:
        """Token ids of ``target`` after the prompt: a continuation with a leading space in plain text, the start
        of the reply (no leading space) after a chat template's generation prompt."""
        text = target.strip() if self.chat else (target if target[:1].isspace() else " " + target)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids = [t for t in ids if t not in special]
        if len(ids) > 1 and tokenizer.decode([ids[0]]).strip() == "":
            ids = ids[1:]  # a lone leading-space token
        if not ids or not tokenizer.decode(ids).strip():
            raise ValueError(f"the target {target!r} has no text besides special tokens and spaces")
        return ids


PLAIN = PromptFormat()


def prompt_format(tokenizer, name: str = "plain") -> PromptFormat:
    """The :class:`PromptFormat` called ``name`` (one of :data:`PROMPT_FORMATS`) for ``tokenizer``.

    ``"chat"`` renders the tokenizer's chat template for one user message and the generation prompt (with the
    template's default system message, if it adds one) and raises ``ValueError`` when there is no template."""
    if name == "plain":
        return PLAIN
    if name != "chat":
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {name!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt_format='chat' needs a tokenizer with a chat template; this "
                         f"{type(tokenizer).__name__} has none (use prompt_format='plain', or set "
                         "tokenizer.chat_template)")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _USER_TEXT}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(_USER_TEXT) != 1:
        raise ValueError("the tokenizer's chat template does not show the user's message verbatim, once; "
                         "use prompt_format='plain'")
    head, _, tail = rendered.partition(_USER_TEXT)
    return PromptFormat("chat", head, tail)
