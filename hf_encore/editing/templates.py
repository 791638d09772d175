"""Context templates: the raw ``"{}"`` plus short model-generated prefixes ``"<generated>. {}"`` (docs/algorithm.md §2).

Generated once per adapter with a fixed seed (the reference code did not seed them) and kept as adapter state.
"""

from __future__ import annotations

import torch

from ..placement import input_device

TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_templates(
    lm, tokenizer, *, count: int = 5, length: int = 10, seed: int = 0, starts: tuple[str, ...] = TEMPLATE_STARTS
) -> list[str]:
    """Return ``["{}", t_1, …, t_count]`` where each t_i is ``"<start + ~length sampled tokens>. {}"``.

    Sampling is top-k 5 under a seeded generator that does not disturb the global RNG. Braces are removed from the
    generated text so the templates contain exactly one ``{}``.
    """
    templates = ["{}"]
    device = input_device(lm)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # sampling runs on the lm_head's GPU
        torch.manual_seed(seed)
        for i in range(count):
            start = starts[i % len(starts)]
            enc = tokenizer(start, return_tensors="pt").to(device)
            out = lm.generate(
                **enc, do_sample=True, top_k=5, top_p=1.0, temperature=1.0, max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
            templates.append(text + ". {}")
    return templates
