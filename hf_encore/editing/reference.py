"""The executable specification of the steps that read the model: each computed the straightforward way, as the
original MEMIT / AlphaEdit code does — one request at a time, a full forward pass (all layers, full-vocabulary logits
at every position) at every optimisation step, keys by a full forward pass per layer, one statistics pass per layer.

They compute the same quantities as the optimised steps in ``targets.py``, ``keys.py`` and ``stats.py`` (same loss,
Adam, clamp, MPES rule, key averaging; docs/algorithm.md §2–5) with none of their caching, batching or truncation,
so they are the yardstick both for speed (``benchmarks/speed.py``) and for correctness: ``tests/test_reference_path.py``
checks on a tiny model that both give the same z, keys and deltas. Use them through the pipeline:

    model.edit(requests, steps=REFERENCE_STEPS)
    model.base_model.compute_statistics(corpus, steps=REFERENCE_STEPS)
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .pipeline import EditSteps
from .targets import LOSS_THRESHOLD, TargetResult, TargetSettings, step_sizes
from .tracing import ModelAccess, pad_right


def _full_logits(access: ModelAccess, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return access.lm(input_ids=ids.to(access.input_device), attention_mask=mask.to(access.input_device),
                     use_cache=False).logits.float()


def reference_optimise_targets(access: ModelAccess, prepared, layer: int, settings: TargetSettings, pad_id: int,
                               progress: bool = True) -> TargetResult:
    zs, h_inits, steps, stopped, p_before, final_loss = [], [], [], [], [], []
    block = access.blocks[layer]
    for req in tqdm(prepared, desc="reference z-optimisation", disable=not progress, leave=False):
        ids = [p.ids + req.target_ids[:-1] for p in req.prompts] + [req.kl_prompt.ids]
        lookup = torch.tensor([p.subject_last for p in req.prompts] + [req.kl_prompt.subject_last],
                              device=access.input_device)
        batch_ids, mask = pad_right(ids, pad_id)
        rows = torch.arange(len(ids), device=access.input_device)
        captured = {}

        def capture(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured["h"] = out[0, lookup[0]].detach().float()

        handle = block.register_forward_hook(capture)
        with torch.no_grad():
            _full_logits(access, batch_ids, mask)
        handle.remove()
        h_init = captured["h"]
        delta = torch.zeros_like(h_init, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=float(step_sizes(settings, h_init.unsqueeze(0))[0]))

        def add_delta(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            out = out.clone()
            out[rows, lookup] += delta.to(out.device, out.dtype)
            return (out, *output[1:]) if isinstance(output, (tuple, list)) else out

        handle = block.register_forward_hook(add_delta)
        n_prompts = len(req.prompts)
        count, n_steps, by_mpes, log_p0, loss_value = 0, 0, False, None, float("nan")
        try:
            for it in range(settings.num_steps):
                log_probs = _full_logits(access, batch_ids, mask).log_softmax(-1)  # [rows, T, V]
                nll, ok = 0.0, True
                for t, prompt in enumerate(req.prompts):
                    start = len(prompt.ids) - 1
                    target = torch.tensor(req.target_ids, device=log_probs.device)
                    lp = log_probs[t, start: start + len(target)]
                    nll = nll - lp.gather(1, target.unsqueeze(1)).sum() / len(target)
                    checked = t > 0 or settings.mpes_check_raw_prompt or n_prompts == 1
                    ok = ok and (not checked or bool((lp.argmax(-1) == target).all()))
                    if it == 0 and t == 0:
                        p_before.append(float(lp.detach().gather(1, target.unsqueeze(1)).sum().exp()))
                nll = nll / n_prompts
                kl_logq = log_probs[-1, lookup[-1]]
                if log_p0 is None:
                    log_p0 = kl_logq.detach()
                kl = settings.kl_factor * (kl_logq.exp() * (kl_logq - log_p0)).sum()
                loss = nll + kl + settings.weight_decay * delta.norm() / h_init.norm() ** 2
                loss_value = float(loss.detach())
                if settings.mpes and ok:
                    count += 1
                    if count == settings.mpes_extra_steps + 1:
                        by_mpes = True
                        break
                if loss_value < LOSS_THRESHOLD or it == settings.num_steps - 1:
                    break
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    limit = settings.clamp_norm_factor * h_init.norm()
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
                n_steps += 1
        finally:
            handle.remove()
        zs.append((h_init + delta.detach()).cpu())
        h_inits.append(h_init.cpu())
        steps.append(n_steps)
        stopped.append(by_mpes)
        final_loss.append(loss_value)
    return TargetResult(torch.stack(zs), torch.stack(h_inits), steps, stopped, p_before, final_loss)


@torch.no_grad()
def reference_key_pass_inputs(access: ModelAccess, prepared, first_layer: int, pad_id: int, max_tokens: int):
    """No shared work: each layer's key pass starts from the token ids of the whole prompts."""
    return prepared, pad_id


@torch.no_grad()
def reference_keys_and_outputs(access: ModelAccess, inputs, key_layer: int,
                               output_layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prepared, pad_id = inputs
    keys, raw_keys, outs = [], [], []
    for req in prepared:
        batch_ids, mask = pad_right([p.ids for p in req.prompts], pad_id)
        lookup = torch.tensor([p.subject_last for p in req.prompts], device=access.input_device)
        rows = torch.arange(len(req.prompts), device=access.input_device)
        got = {}
        handles = [
            access.w_out(key_layer).register_forward_pre_hook(
                lambda m, args: got.__setitem__("k", args[0][rows, lookup].double().cpu())),
            access.blocks[output_layer].register_forward_hook(
                lambda m, a, out: got.__setitem__("h", (out[0] if isinstance(out, tuple) else out)[0, lookup[0]]
                                                  .double().cpu())),
        ]
        try:
            _full_logits(access, batch_ids, mask)
        finally:
            for h in handles:
                h.remove()
        k = got["k"]
        keys.append(k[0] if len(k) == 1 else 0.5 * k[0] + 0.5 * k[1:].mean(0))
        raw_keys.append(k[0])
        outs.append(got["h"])
    return torch.stack(keys, 1), torch.stack(raw_keys, 1), torch.stack(outs, 1)


@torch.no_grad()
def reference_second_moments(access: ModelAccess, chunks: list[list[int]], layers: Sequence[int], pad_id: int,
                             max_tokens: int, progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    sums, count = {}, 0
    per_batch = max(1, max_tokens // max(len(c) for c in chunks))
    for layer in layers:
        count = 0
        for start in tqdm(range(0, len(chunks), per_batch), desc=f"reference statistics, layer {layer}",
                          disable=not progress, leave=False):
            ids, mask = pad_right(chunks[start: start + per_batch], pad_id)
            got = {}
            handle = access.w_out(layer).register_forward_pre_hook(lambda m, args: got.__setitem__("k", args[0]))
            try:
                _full_logits(access, ids, mask)
            finally:
                handle.remove()
            k = got["k"][mask.bool().to(access.input_device)].float()
            kk = (k.T @ k).double().cpu()
            sums[layer] = kk if layer not in sums else sums[layer] + kk
            count += int(mask.sum())
    return {layer: s / count for layer, s in sums.items()}, count


REFERENCE_STEPS = EditSteps(
    optimise_targets=reference_optimise_targets,
    key_pass_inputs=reference_key_pass_inputs,
    keys_and_outputs=reference_keys_and_outputs,
    second_moments=reference_second_moments,
)
