"""Registration with PEFT's lookup tables (PEFT has no plugin mechanism for new methods; docs/architecture.md).

PEFT ≥ 0.21 delegates saving and loading to the tuner class found in ``peft.mapping``; inserting our config, tuner
and prefix there under a ``str`` enum key makes ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and transformers' ``load_adapter`` work unchanged.
"""

from __future__ import annotations

import peft.mapping as peft_mapping
from peft.utils import PeftType

from .config import EncoreConfig, EncorePeftType
from .model import EncoreModel

_KEY = EncorePeftType.ENCORE


def register() -> None:
    """Insert the Encore method into PEFT's tables (idempotent)."""
    if "ENCORE" in PeftType.__members__:
        raise RuntimeError("PEFT now defines its own ENCORE type; this hf_encore release cannot register over it")
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[_KEY] = EncoreConfig
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[_KEY] = EncoreModel
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[_KEY] = EncoreModel.prefix
