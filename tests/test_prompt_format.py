"""Prompts in plain text or inside the tokenizer's chat template (``EncoreConfig.prompt_format``)."""

from __future__ import annotations

import pytest
import torch

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.apps.cli import main
from hf_encore.editing.prompt_format import PLAIN, prompt_format
from hf_encore.editing.requests import parse_requests, prepare_requests
from hf_encore.evaluation import counterfact_scores, score_continuations

from tiny_models import TINY_CORPUS, TINY_EDIT, TINY_LAYERS, deltas, save_tiny_model, tiny_llama, tiny_tokenizer

# ChatML, as SmolLM2 and Qwen2.5 use it, with a default system message.
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REQUEST = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


def test_chat_form_is_the_rendered_template_around_the_user_text():
    tokenizer = chat_tokenizer()
    form = prompt_format(tokenizer, "chat")
    text = "LeBron James plays the sport of"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    assert form.wrap(text) == rendered
    assert form.encode(tokenizer, text) == tokenizer(rendered, add_special_tokens=False).input_ids
    # The reply starts the target: no leading space, unlike a plain continuation.
    assert tokenizer.decode(form.target_ids(tokenizer, "football")) == "football"
    assert tokenizer.decode(PLAIN.target_ids(tokenizer, "football")) == " football"
    assert prompt_format(tokenizer, "plain") is PLAIN


def test_chat_requests_locate_the_subject_inside_the_user_turn():
    tokenizer = chat_tokenizer()
    form = prompt_format(tokenizer, "chat")
    templates = ["{}", "Once upon a time. {}"]
    (prepared,) = prepare_requests(tokenizer, parse_requests([REQUEST]), templates, form)
    for template, prompt in zip(templates, prepared.prompts):
        user_text = template.replace("{}", "LeBron James plays the sport of")
        assert prompt.ids == form.encode(tokenizer, user_text)
        # The subject's last token, and the prompt runs on to the generation prompt after it.
        assert tokenizer.decode(prompt.ids[: prompt.subject_last + 1]).endswith("LeBron James")
        assert tokenizer.decode(prompt.ids).endswith("<|im_start|>assistant\n")
    assert prepared.kl_prompt.ids == form.encode(tokenizer, "LeBron James is a")
    assert prepared.target_ids == form.target_ids(tokenizer, "football")


def test_chat_form_without_a_template_is_refused_before_anything_changes(stats_cache):
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        prompt_format(tiny_tokenizer(), "chat")
    model = get_encore_model(tiny_llama(), EncoreConfig(layers=list(TINY_LAYERS), **TINY_EDIT),
                             tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)
    before = deltas(model)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        model.edit([REQUEST], prompt_format="chat", progress=False)
    assert all(torch.equal(before[k], v) for k, v in deltas(model).items())
    assert model.base_model.edit_states["default"].num_edits == 0
    with pytest.raises(ValueError, match="prompt_format"):
        EncoreConfig(prompt_format="instruct")


def test_an_edit_through_the_chat_form_is_scored_in_that_form(stats_cache):
    """The report's p(target) after a chat-form edit is what evaluation in the chat form reads; the ledger records
    the form."""
    tokenizer = chat_tokenizer()
    model = get_encore_model(tiny_llama(), EncoreConfig(layers=list(TINY_LAYERS), prompt_format="chat", **TINY_EDIT),
                             tokenizer=tokenizer, corpus=TINY_CORPUS)
    (request,) = model.edit([REQUEST], progress=False).requests
    form = prompt_format(tokenizer, "chat")
    with torch.no_grad():
        chat = score_continuations(model, tokenizer, ["LeBron James plays the sport of"], ["football"], form=form)
        plain = score_continuations(model, tokenizer, ["LeBron James plays the sport of"], ["football"])
    assert float(chat.token_logprobs[0].sum().exp()) == pytest.approx(request.p_target_after, rel=1e-4)
    assert float(plain.token_logprobs[0].sum().exp()) != pytest.approx(request.p_target_after, rel=1e-2)
    assert model.base_model.edit_states["default"].ledger[-1]["settings"]["prompt_format"] == "chat"
    case = {**REQUEST, "target_true": "basketball", "rephrase_prompt": "LeBron James is a player of",
            "locality_prompt": "Serena Williams plays the sport of", "locality_ground_truth": "tennis"}
    scores = counterfact_scores(model, tokenizer, [case], form=form)
    assert {"ES", "PS", "NS"} <= set(scores)


def test_cli_edits_and_evaluates_in_the_chat_form(tmp_path, stats_cache, capsys):
    model_dir = save_tiny_model(tmp_path / "base")
    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(model_dir)
    requests = tmp_path / "requests.json"
    requests.write_text('[{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}]')
    settings = [x for key, value in TINY_EDIT.items() for x in ("--set", f"{key}={value}")]
    assert main(["edit", str(requests), "--model", str(model_dir), "--out", str(tmp_path / "adapter"), "--layers",
                 "1", "2", "--prompt-format", "chat", "--corpus", str(model_dir / "corpus.txt"), "--quiet",
                 *settings]) == 0
    import json

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["prompt_format"] == "chat"
    capsys.readouterr()
    assert main(["ask", "LeBron James plays the sport of", "--model", str(model_dir), "--adapter",
                 str(tmp_path / "adapter"), "--target", "football", "--prompt-format", "chat",
                 "--max-new-tokens", "2"]) == 0
    assert "p('football')" in capsys.readouterr().out
