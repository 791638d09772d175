"""hf_encore: lifelong knowledge editing (MEMIT, AlphaEdit, ENCORE) for Hugging Face models, as a PEFT adapter.

    from hf_encore import get_encore_model, EncoreConfig, load_model
    base, tokenizer = load_model()                       # the built-in SmolLM2-135M
    model = get_encore_model(base, EncoreConfig(method="encore"), tokenizer=tokenizer)
    report = model.edit([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}])
    model.save_pretrained("edits/")                      # deltas + what is needed to continue editing
    model = hf_encore.from_pretrained(base, "edits/")    # later, in another process: use, or edit further
"""

from __future__ import annotations

from .config import METHOD_PRESETS, METHODS, EncoreConfig
from .easyedit import edit_facts
from .editing.pipeline import NormRatioExceededError
from .editing.report import EditReport
from .editing.requests import EditRequest
from .fingerprint import BaseModelMismatchError
from .hub import push_to_hub
from .layer import EncoreLayer
from .loading import DEFAULT_MODEL, load_model
from .model import EditStateMissingError, EncoreModel
from .peft_model import EncorePeftModel, from_pretrained
from .registry import register
from .save_transaction import SaveLockTimeout, SaveTargetError
from .serialization import AdapterFileError

register()

__all__ = [
    "AdapterFileError", "BaseModelMismatchError", "DEFAULT_MODEL", "EditReport", "EditRequest",
    "EditStateMissingError", "EncoreConfig", "EncoreLayer", "EncoreModel", "EncorePeftModel", "METHODS",
    "METHOD_PRESETS", "NormRatioExceededError", "SaveLockTimeout", "SaveTargetError", "edit_facts",
    "from_pretrained", "get_encore_model", "load_model", "push_to_hub",
]
__version__ = "0.1.0"


def get_encore_model(model, config: EncoreConfig | None = None, *, adapter_name: str = "default", tokenizer=None,
                     corpus=None) -> EncorePeftModel:
    """Wrap a transformers causal LM in an :class:`EncorePeftModel` (a ``PeftModelForCausalLM``) carrying an
    Encore adapter.

    ``tokenizer`` is kept for ``edit()`` (else loaded from the model's ``name_or_path``); ``corpus`` is the text used
    for the second-moment statistics (else model-generated text, with a warning).
    """
    peft_model = EncorePeftModel(model, config or EncoreConfig(), adapter_name=adapter_name)
    peft_model.base_model.set_editing_inputs(tokenizer, corpus)
    return peft_model
