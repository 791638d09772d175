"""The model card: Hub metadata written with huggingface_hub's ModelCardData, parsed back intact."""

from __future__ import annotations

from huggingface_hub import ModelCard

from hf_encore.card import model_card

from tiny_models import tiny_adapter


def card_of(model, **kwargs):
    return ModelCard(model_card(model.peft_config["default"], model.base_model.edit_states["default"], **kwargs))


def test_card_metadata_parses_back_with_base_relation_results_and_extra_fields():
    model = tiny_adapter()
    config = model.peft_config["default"]
    config.base_model_name_or_path, config.base_model_builtin = "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"
    config.gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    card = card_of(model, metrics={"efficacy": 0.98, "specificity": 0.71},
                   extra_metadata={"datasets": ["wikitext"], "language": ["en"]})
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.base_model_relation == "adapter"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"  # the built-in's base, known to hf_encore
    assert {"peft", "hf_encore", "knowledge-editing", "memit"} <= set(data.tags)
    assert data.datasets == ["wikitext"] and data.language == ["en"]
    assert {(r.metric_type, r.metric_value) for r in data.eval_results} == {("efficacy", 0.98), ("specificity", 0.71)}
    # The body is kept: the snippet loads the built-in the adapter was made on, settings and edits follow.
    assert 'hf_encore.load_model(\'smollm2-135m\')' in card.text and "## Settings" in card.text
    assert "## Ledger" in card.text and "Player 0" in card.text


def test_a_local_path_is_never_the_cards_base_model(tmp_path):
    model = tiny_adapter()
    config = model.peft_config["default"]
    config.base_model_name_or_path = str(tmp_path)
    data = card_of(model).data
    assert data.base_model is None and "base_model_relation" not in data.to_dict() and data.library_name == "peft"
    config.base_model_name_or_path, config.gguf_file = "someone/model-GGUF", "model.Q4_K_M.gguf"
    card = card_of(model)
    assert card.data.base_model == "someone/model-GGUF"
    assert "from_pretrained('someone/model-GGUF', gguf_file='model.Q4_K_M.gguf')" in card.text
