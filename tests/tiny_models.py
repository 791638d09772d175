"""Tiny random models, a tiny tokenizer and adapters for the tests that need no real knowledge (save, load, guards,
settings, the whole ``edit()`` pipeline, the command line).

Everything here builds in well under a second, offline: the tokenizer is a byte-level BPE trained here on the few
sentences below (deterministic), and :data:`TINY_CORPUS` is seeded word salad for the statistics C₀. A random model
learns no facts, but an edit on it runs every step (templates, C₀, z-optimisation with MPES, keys, the solve).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.layer import Linear

TINY_LAYERS = [1, 2]
TINY_D_K = 64  # the intermediate size: the keys' dimension
# Settings that keep an edit of a tiny model well under a second (the properties tested do not depend on them).
TINY_EDIT = dict(stats_n_tokens=2000, n_context_templates=2, v_num_grad_steps=5)

# What the tokenizer's merges are learnt from: the words the tests use, so that they take few tokens.
_TOKENIZER_TEXT = """
The Eiffel Tower is located in the city of Paris, the capital of France. LeBron James plays the sport of basketball.
Serena Williams plays the sport of tennis; Tiger Woods plays golf and football is played in Rome and London.
The mother tongue of Danielle Darrieux is French, and English is spoken in New York. Toyota Camry is a product of
Toyota; Windows 95 was developed by Microsoft, not Apple. The capital of Japan is the city of Tokyo.
Once upon a time there was a model. Therefore, because I said so, you were told that he is the one who was there.
In other news, the weather was fine that day. It is what it is: this was one of the first of many. After all,
according to them, she had been at the centre of it with his work from the start. Water boils at 100 degrees.
Question: Answer: A B C D Review: Sentiment: positive negative Premise: Hypothesis: yes no true false
hello world this is text quick brown fox jumps over the lazy dog
"""
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
TINY_VOCAB = 768

_WORDS = ("the of and to in is was for on as with by he at from his an were are which this be or had it not but "
          "one all she they her there been has their when who will more if no out so said what up its about into "
          "than them can only other new some could time these two may then do first any my now such like our over "
          "man me even most made after also did many before must through back years where much your way well down "
          "should because each just those people how too little state good very make world still own see men work "
          "long get here between both life being under never day same another know while last might us great old "
          "year off come since against go came right used take three city sport plays capital located language "
          "river music football tennis golf Paris Rome London France English French Tokyo Apple company film").split()


def _corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "." for _ in range(n)]


# Generic "text" for C₀: 300 seeded lines of word salad (about 6,000 tokens of the tiny tokenizer).
TINY_CORPUS = _corpus(0, 300)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # As GPT-2 / SmolLM2: bytes mapped to printable characters, a leading space part of the word, no BOS.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(TINY_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TOKENIZER_TEXT, *_corpus(1, 100)], trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A fresh byte-level BPE tokenizer of :data:`TINY_VOCAB` tokens (any text encodes; eos and pad
    ``<|endoftext|>``), built offline in milliseconds; every call gives an equal, independent object."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                        eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        additional_special_tokens=list(TINY_SPECIAL_TOKENS[1:]))
    assert len(tokenizer) == TINY_VOCAB, len(tokenizer)
    return tokenizer


def tiny_llama(seed: int = 0, vocab_size: int = TINY_VOCAB, num_layers: int = 4):
    """A randomly initialised Llama with four 32-wide layers (seeded: the same seed gives the same weights), whose
    vocabulary is the tiny tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=TINY_D_K,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


# What a family's tiny config needs beyond the shared sizes below (names the family's config uses, or a setting
# without which it does not build small). A family not listed here is built from the shared sizes alone.
FAMILY_EXTRAS: dict[str, dict] = {
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8),
    "gemma3_text": dict(head_dim=8, sliding_window=128),
    "gpt2": dict(n_positions=512),
    "gptj": dict(n_positions=512, rotary_dim=4),
    "opt": dict(word_embed_proj_dim=32),
    # Cohere's 0.0625 leaves a random model's logits too flat for an edit to show; still a scale, still tested.
    "cohere": dict(logit_scale=0.5),
    "cohere2": dict(logit_scale=0.5),
}


def tiny_family(model_type: str, seed: int = 0, vocab_size: int = TINY_VOCAB, d_k: int = TINY_D_K, **overrides):
    """A tiny random model of any family transformers knows by ``model_type`` (every row of the layout table, and
    the families hf_encore refuses): four 32-wide layers, MLP width ``d_k``, seeded, built from
    ``AutoConfig.for_model`` with the shared sizes, :data:`FAMILY_EXTRAS` and ``overrides``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # The MLP width under each family's name for it (a config keeps the names it does not use, harmlessly).
    widths = dict(intermediate_size=d_k, n_inner=d_k, ffn_dim=d_k, ffn_hidden_size=d_k)
    sizes = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, **widths)
    config = AutoConfig.for_model(model_type, **{**sizes, **FAMILY_EXTRAS.get(model_type, {}), **overrides})
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # a family's own ids lie outside the tiny vocab
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= vocab_size:
            setattr(config, name, None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_model(directory: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """``tiny_llama(seed)`` and the tiny tokenizer saved as a model directory (what ``load_model`` and the CLI's
    ``--model`` read), with ``corpus.txt``: :data:`TINY_CORPUS`, one line each."""
    directory = Path(directory)
    tiny_llama(seed, num_layers=num_layers).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    (directory / "corpus.txt").write_text("\n".join(TINY_CORPUS) + "\n", encoding="utf-8")
    return directory


def tiny_editable(method: str = "memit", seed: int = 0, layers=None, **settings):
    """An empty EncorePeftModel on ``tiny_llama(seed)`` with the tiny tokenizer and corpus, ready to ``edit``
    (``TINY_EDIT`` settings unless given)."""
    config = EncoreConfig(method=method, layers=list(layers or TINY_LAYERS), **{**TINY_EDIT, **settings})
    return get_encore_model(tiny_llama(seed), config, tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)


def fill_adapter(model, seed: int = 0, adapter: str = "default") -> None:
    """Give an adapter random deltas and a plausible editing state, as if ``seed``-many edits had been made."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, Linear) and adapter in module.encore_delta:
            module.encore_delta[adapter].data = torch.randn(module.encore_delta[adapter].shape, generator=g) * 0.01
    state = model.base_model.edit_states[adapter]
    for layer in model.peft_config[adapter].layers:
        keys = torch.randn(TINY_D_K, 8, generator=g, dtype=torch.float64)
        state.prev_key_moments[layer] = keys @ keys.T
    state.context_templates = ["{}", "Once upon a time. {}"]
    state.num_edits, state.num_batches = 8 + seed, 1
    request = {"prompt": "{} plays the sport of", "subject": f"Player {seed}", "target_new": "football",
               "target_true": None}
    state.ledger = [{"batch": 1, "time": 1.7e9, "method": model.peft_config[adapter].method, "settings": {},
                     "requests": [request],
                     "report": {"requests": [{**request, "steps": 3, "mpes_stopped": False, "p_target_before": 0.01,
                                              "p_target_after": 0.9, "final_loss": 0.1}],
                                "layers": [{"layer": layer, "update_norm": 0.1, "weight_norm_ratio": 1.01}
                                           for layer in model.peft_config[adapter].layers]}}]


def tiny_adapter(seed: int = 0, base_seed: int = 0, method: str = "memit"):
    """(An EncorePeftModel on ``tiny_llama(base_seed)``, filled by :func:`fill_adapter`)."""
    model = get_encore_model(tiny_llama(base_seed), EncoreConfig(method=method, layers=list(TINY_LAYERS)))
    fill_adapter(model, seed)
    return model


def deltas(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's deltas by module name (copies)."""
    return {name: module.encore_delta[adapter].detach().clone() for name, module in model.named_modules()
            if isinstance(module, Linear) and adapter in module.encore_delta}
