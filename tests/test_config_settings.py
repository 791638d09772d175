"""The algorithm's settings: one list for the ledger, the model card and ``hf-encore show``; combinations refused."""

from __future__ import annotations

import json

import pytest

from hf_encore import EncoreConfig
from hf_encore.apps.cli import main as cli_main
from hf_encore.card import model_card
from hf_encore.config import ALGORITHM_SETTINGS

from tiny_models import tiny_editable


@pytest.fixture(scope="module")
def edited():
    model = tiny_editable(method="encore", norm_weight=0.07)
    model.edit([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}],
               progress=False)
    return model


def test_ledger_card_and_show_report_the_same_settings(edited, tmp_path, capsys):
    config = edited.peft_config["default"]
    expected = config.algorithm_settings()
    assert list(expected) == list(ALGORITHM_SETTINGS) and expected["norm_weight"] == 0.07
    assert edited.base_model.edit_states["default"].ledger[-1]["settings"] == expected

    card = model_card(config, edited.base_model.edit_states["default"])
    for name in ALGORITHM_SETTINGS:
        assert f"| {name} |" in card

    edited.save_pretrained(tmp_path / "adapter")
    assert cli_main(["show", str(tmp_path / "adapter"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["settings"] == json.loads(json.dumps(expected))


def test_projection_without_a_ridge_is_refused_when_configured():
    with pytest.raises(ValueError, match="nullspace_projection=True needs norm_weight > 0"):
        EncoreConfig(method="alphaedit", norm_weight=0.0)
    with pytest.raises(ValueError, match="nullspace_projection=True needs norm_weight > 0"):
        EncoreConfig(method="alphaedit").with_overrides(norm_weight=0)
    EncoreConfig(method="alphaedit", norm_weight=0.01)  # AlphaEdit's own setting stays valid
