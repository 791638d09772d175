"""Editing with each method (issue: core, §3–4): real facts in the real SmolLM2-135M (slow: what the edited model
says), and on a tiny random Llama what holds whatever the model knows (update sizes, MPES, report, determinism,
token budgets) and the equivalence of the optimised passes to plain forwards."""

from __future__ import annotations

import pytest
import torch

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.evaluation import continuation_nll

from tiny_models import TINY_CORPUS, TINY_LAYERS, tiny_llama, tiny_tokenizer

N_FACTS = 5
# Five facts for the tiny model (it knows none of them: only the mechanics are tested there).
FACTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "{} is a product of", "subject": "Toyota Camry", "target_new": "Apple"},
    {"prompt": "{} was developed by", "subject": "Windows 95", "target_new": "Apple"},
]
# Facts the tiny model can be edited towards: a random model carries little from the subject to a later position,
# so here the subject ends the prompt, and the targets are one token each. MPES stops 3 of the 5 z-optimisations.
EDITABLE = [
    {"prompt": "The sport played by {}", "subject": "LeBron James", "target_new": "football"},
    {"prompt": "The city that holds {}", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The language of {}", "subject": "Danielle Darrieux", "target_new": "French"},
    {"prompt": "The home city of {}", "subject": "Toyota Camry", "target_new": "London"},
    {"prompt": "The music of {}", "subject": "Windows 95", "target_new": "tennis"},
]
TINY = dict(layers=list(TINY_LAYERS), stats_n_tokens=2000, n_context_templates=2)


def edit_requests(cases):
    return [{k: c[k] for k in ("prompt", "subject", "target_new")} for c in cases[:N_FACTS]]


def unrelated_prompts(cases):
    return [c["locality_prompt"] for c in cases[:N_FACTS]] + [
        c["prompt"].replace("{}", c["subject"]) for c in cases[N_FACTS: N_FACTS + 15]]


@torch.no_grad()
def top_tokens(model, tokenizer, prompts):
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")
        out.append(int(model(**ids).logits[0, -1].argmax()))
    return out


def deltas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "encore_delta" in n}


@pytest.fixture(scope="module")
def edited(request, smollm2_dir, tokenizer, corpus_path, cases):
    """Each method's edit of the same 5 real facts in SmolLM2, run once per module: {name: (report, deltas,
    scores)}."""
    from hf_encore.loading import load_model

    results = {}
    before_top = None
    for name, cfg in {
        "memit": EncoreConfig(method="memit"),
        "encore": EncoreConfig(method="encore"),
        "alphaedit": EncoreConfig(method="alphaedit"),
    }.items():
        base = load_model(str(smollm2_dir))[0]
        if before_top is None:
            before_top = top_tokens(base, tokenizer, unrelated_prompts(cases))
        model = get_encore_model(base, cfg, tokenizer=tokenizer, corpus=corpus_path)
        report = model.edit(edit_requests(cases), progress=False)
        facts = cases[:N_FACTS]
        prompts = [c["prompt"].replace("{}", c["subject"]) for c in facts]
        nll_new = continuation_nll(model, tokenizer, prompts, [c["target_new"] for c in facts])
        nll_true = continuation_nll(model, tokenizer, prompts, [c["target_true"] for c in facts])
        kept = sum(a == b for a, b in zip(before_top, top_tokens(model, tokenizer, unrelated_prompts(cases))))
        results[name] = {"report": report, "deltas": deltas(model), "new_beats_true": (nll_new < nll_true).tolist(),
                         "kept_fraction": kept / len(before_top)}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("method", ["memit", "encore", "alphaedit"])
def test_method_writes_every_fact(edited, method):
    result = edited[method]
    assert all(result["new_beats_true"]), (method, result["new_beats_true"], str(result["report"]))
    assert all(r.p_target_after > r.p_target_before for r in result["report"].requests)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["memit", "encore", "alphaedit"])
def test_unrelated_prompts_keep_their_answer(edited, method):
    assert edited[method]["kept_fraction"] >= 0.8, edited[method]["kept_fraction"]


def tiny_model(method="encore", **settings):
    config = EncoreConfig(method=method, **{**TINY, **settings})
    return get_encore_model(tiny_llama(0), config, tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)


@pytest.fixture(scope="module")
def tiny_edited(tmp_path_factory):
    """Each method's edit of EDITABLE in the tiny Llama (default steps), once per module: {name: (report, deltas)}."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENCORE_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        results = {}
        for name, settings in {"memit": dict(method="memit"), "encore": dict(method="encore"),
                               "encore_no_mpes": dict(method="encore", mpes=False)}.items():
            model = tiny_model(**settings)
            results[name] = {"report": model.edit(EDITABLE, progress=False), "deltas": deltas(model)}
        yield results
    finally:
        mp.undo()


def test_encore_update_is_smaller_than_memit(tiny_edited):
    edited = tiny_edited
    memit = {lay.layer: lay.delta_norm for lay in edited["memit"]["report"].layers}
    encore = {lay.layer: lay.delta_norm for lay in edited["encore"]["report"].layers}
    assert sum(encore.values()) < sum(memit.values())
    assert all(encore[layer] < memit[layer] for layer in memit), (memit, encore)


def test_mpes_takes_fewer_steps(tiny_edited):
    edited = tiny_edited
    with_mpes = edited["encore"]["report"].requests
    without = edited["encore_no_mpes"]["report"].requests
    assert any(r.mpes_stopped for r in with_mpes)
    assert not any(r.mpes_stopped for r in without)
    assert sum(r.steps for r in with_mpes) < sum(r.steps for r in without)


def test_report_has_layer_norms(tiny_edited):
    report = tiny_edited["memit"]["report"]
    assert [lay.layer for lay in report.layers] == TINY_LAYERS
    assert all(lay.delta_norm > 0 and lay.weight_norm_ratio > 1.0 for lay in report.layers)
    assert set(report.seconds) >= {"templates", "statistics", "targets", "keys", "solve", "total"}


def test_same_requests_give_identical_deltas(tiny_edited):
    model = tiny_model("encore")
    model.edit(EDITABLE, progress=False)
    again = deltas(model)
    first = tiny_edited["encore"]["deltas"]
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_token_budget_changes_memory_not_results(tiny_edited):
    """max_tokens_per_forward only splits the passes (benchmarks/memory.py measures what it saves): the smallest
    budget, below one request's prompts, gives the default budget's z-steps and deltas up to float rounding."""
    model = tiny_model("memit", max_tokens_per_forward=64)
    assert 64 < sum(len(model.base_model.tokenizer(f["prompt"].replace("{}", f["subject"]))["input_ids"])
                    for f in EDITABLE) * (1 + TINY["n_context_templates"])  # the budget does split the passes
    report = model.edit(EDITABLE, progress=False)
    small, default = deltas(model), tiny_edited["memit"]["deltas"]
    assert [r.steps for r in report.requests] == [r.steps for r in tiny_edited["memit"]["report"].requests]
    # 25 Adam steps per request amplify the float32 rounding of other batch shapes (1.7e-4 to 3.0e-4 relative on
    # SmolLM2 on this 2-core VM on 2026-11-30), so 1e-3 bounds rounding.
    assert all((small[k] - default[k]).norm() < 1e-3 * default[k].norm() for k in default)


def assert_key_pass_matches_whole_prompts(model, tokenizer, cases, first_layer, key_layers, output_layer):
    """Keys read from prompts cut after the subject, their context template's tokens run once per template, and
    replayed from the first edited block equal keys from a full forward of each whole prompt through the model."""
    from hf_encore.architectures import resolve_layout
    from hf_encore.editing.keys import key_pass_inputs, keys_and_outputs
    from hf_encore.editing.requests import parse_requests, prepare_requests
    from hf_encore.editing.tracing import ModelAccess, pad_right

    access = ModelAccess(model, resolve_layout(model))
    templates = ["{}", "The weather is nice today. {}", "In other news, {}"]
    prepared = prepare_requests(tokenizer, parse_requests(cases[:4]), templates)
    inputs = key_pass_inputs(access, prepared, first_layer, tokenizer.pad_token_id, max_tokens=40)
    assert len(inputs.chunks) > 3  # the budget forces several chunks of each kind
    assert len(inputs.shared_ids) == 2 and sum(g >= 0 for g in inputs.shared) > 2  # templates' tokens run once
    originals = {layer: access.w_out(layer).weight.detach().clone() for layer in key_layers}
    torch.manual_seed(0)
    try:
        for key_layer in key_layers:
            keys, raw_keys, outputs = keys_and_outputs(access, inputs, key_layer, output_layer)
            for r, req in enumerate(prepared):
                ids, mask = pad_right([p.ids for p in req.prompts], tokenizer.pad_token_id)
                got = access.trace(ids, mask, block_outputs=[output_layer], mlp_inputs=[key_layer])
                at = torch.tensor([p.subject_last for p in req.prompts])
                k = got[("key", key_layer)][torch.arange(len(at)), at].double()
                expected_key = 0.5 * k[0] + 0.5 * k[1:].mean(0)
                expected_output = got[("block", output_layer)][0, at[0]].double()
                # Other padding and batch shapes change float32 rounding only.
                assert (keys[:, r] - expected_key).norm() < 1e-5 * expected_key.norm()
                assert (raw_keys[:, r] - k[0]).norm() < 1e-5 * k[0].norm()
                assert (outputs[:, r] - expected_output).norm() < 1e-5 * expected_output.norm()
            # As in edit(): this layer changes before the next one's keys, template tokens included.
            weight = access.w_out(key_layer).weight
            with torch.no_grad():
                weight.add_(0.3 * weight.std() * torch.randn_like(weight))
        with pytest.raises(ValueError, match="below the cached start"):
            keys_and_outputs(access, inputs, first_layer - 1, output_layer)
    finally:
        with torch.no_grad():
            for layer, weight in originals.items():
                access.w_out(layer).weight.copy_(weight)


def test_shared_key_pass_matches_whole_prompt_passes(tiny_tok):
    model = tiny_llama(0, num_layers=6)
    assert_key_pass_matches_whole_prompts(model, tiny_tok, FACTS, 1, (1, 3), 4)


def test_shared_key_pass_on_sliding_window_and_global_layers(tiny_tok):
    """Gemma-3 mixes sliding-window and global layers: the passes stop below the first global layer, whose cache
    stays empty, and the masks still come out right."""
    from test_post_norm import tiny_gemma3

    model = tiny_gemma3(len(tiny_tok), layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                    "sliding_attention"])
    with torch.no_grad():
        for block in model.model.layers:  # weights large enough that a wrong mask or position shows
            block.mlp.down_proj.weight.mul_(4)
    assert_key_pass_matches_whole_prompts(model, tiny_tok, FACTS, 1, (1, 2), 3)


def assert_shared_prefixes_change_nothing(model, ids, split, layer, groups, max_tokens):
    """prefix_states with ``groups`` (their common tokens run once) equals one pass per sequence."""
    from hf_encore.architectures import resolve_layout
    from hf_encore.editing.tracing import ModelAccess

    access = ModelAccess(model, resolve_layout(model))
    separate = access.prefix_states(ids, split, layer, 0, max_tokens)
    shared = access.prefix_states(ids, split, layer, 0, max_tokens, shared_groups=groups)
    assert shared.width == separate.width and torch.equal(shared.split, separate.split)
    for a, b in zip(shared.block_output, separate.block_output):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert shared.keys.keys() == separate.keys.keys()
    for layer in separate.keys:
        pairs = ((shared.keys[layer], separate.keys[layer]), (shared.values[layer], separate.values[layer]))
        for got, expected in pairs:
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), layer


def test_shared_prefixes_give_the_same_prefix_states(tiny_tok):
    """Context-templated prompts start alike: their common tokens run once per template, and every block output
    and stored key/value is the one a separate pass gives (several chunks; a group whose common tokens reach past
    a split is cut at it; a sequence in two groups stays in the first)."""
    texts = ["The weather was fine that day. The Eiffel Tower is located in",
             "The weather was fine that day. LeBron James plays the sport of",
             "The weather was fine that day. Paris is",
             "Paris is the capital of", "Paris is the capital of", "Paris is"]
    tokenizer = tiny_tok
    ids = [tokenizer(t)["input_ids"] for t in texts]
    split = [len(tokenizer("The weather was fine that day. The Eiffel")["input_ids"]) - 1,
             len(tokenizer("The weather was fine that day. LeBron James")["input_ids"]) - 1,
             len(tokenizer("The weather was fine that day. Paris")["input_ids"]) - 1, 3, 1, 0]
    assert sum(map(len, ids)) > 40  # several chunks
    model = tiny_llama(0, num_layers=6)
    assert_shared_prefixes_change_nothing(model, ids, split, 4, [[0, 1, 2], [3, 4, 2], [5]], max_tokens=40)


def test_shared_prefixes_on_sliding_window_layers():
    from test_post_norm import tiny_gemma3

    model = tiny_gemma3(100)
    ids = [[2, 7, 8, 9, 10, 11, 40, 41, 42], [2, 7, 8, 9, 10, 11, 50, 51], [2, 7, 8, 9, 12, 60, 61, 62, 63],
           [2, 30, 31, 32]]
    split = [7, 6, 5, 1]
    assert_shared_prefixes_change_nothing(model, ids, split, 1, [[0, 1, 2], [3]], max_tokens=20)


def test_replay_from_prefix_states_matches_a_full_forward(tiny_tok):
    """The z-optimisation's shortcut (block-L outputs and earlier keys/values computed once, then only the suffix
    through the blocks above L) gives the final hidden states of a full forward with δ added at the split."""
    from hf_encore.architectures import resolve_layout
    from hf_encore.editing.tracing import ModelAccess, pad_right

    model, tokenizer = tiny_llama(0, num_layers=6), tiny_tok  # the blocks above L=3: 4 and 5
    access = ModelAccess(model, resolve_layout(model))
    pad_id = tokenizer.pad_token_id
    ids = [tokenizer(t)["input_ids"] for t in ("The Eiffel Tower is located in the city of",
                                               "LeBron James plays the sport of basketball", "Paris is")]
    split, layer = [4, 2, 0], 3
    assert sum(map(len, ids)) > 24
    prefix = access.prefix_states(ids, split, layer, pad_id, max_tokens=24)  # several chunks
    torch.manual_seed(0)
    delta = 2.0 * torch.randn(len(ids), model.config.hidden_size)
    suffixes = [s[sp:] for s, sp in zip(ids, split)]
    batch_ids, mask = pad_right(suffixes, pad_id)
    hidden = torch.zeros(len(ids), batch_ids.shape[1], model.config.hidden_size)
    for row, s in enumerate(suffixes):
        hidden[row, : len(s)] = prefix.block_output[row][split[row]:]
    hidden[:, 0] += delta
    with torch.no_grad():
        replayed = access.replay_suffix(layer, prefix, [0, 1, 2], hidden, batch_ids, mask)
    for row, seq in enumerate(ids):
        def add_delta(module, args, output, row=row):
            out = output[0] if isinstance(output, tuple) else output
            out = out.clone()
            out[0, split[row]] += delta[row]
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handle = access.blocks[layer].register_forward_hook(add_delta)
        try:
            with torch.no_grad():
                full = access.final_hidden(*pad_right([seq], pad_id))
        finally:
            handle.remove()
        expected = full[0, split[row]:]
        got = replayed[row, : len(suffixes[row])]
        assert (got - expected).norm() < 1e-4 * expected.norm(), row


@pytest.mark.parametrize("scale", [None, 0.25])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_log_probs_match_autograd_of_the_full_logits(scale, softcap):
    from types import SimpleNamespace

    from hf_encore.editing.tracing import LogitMap, ModelAccess

    torch.manual_seed(0)
    m, d, vocab = 7, 5, 11
    unembedding = torch.nn.Linear(d, vocab, bias=True)
    access = SimpleNamespace(unembedding=unembedding, logit_map=LogitMap(scale, softcap))
    hidden = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    unembedding.double()
    labels = torch.randint(vocab, (m,))
    upstream = torch.randn(m, dtype=torch.float64)

    logits = ModelAccess.logits(access, hidden)
    reference = logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), hidden)
    # A budget of 2 rows of logits: the 7 rows go through the unembedding in 4 chunks.
    log_p, argmax = ModelAccess.token_log_probs(access, hidden, labels, max_logits=2 * vocab + 1)
    (grad,) = torch.autograd.grad((log_p * upstream).sum(), hidden)
    torch.testing.assert_close(log_p, reference)  # both float32, as the logits are
    torch.testing.assert_close(grad, grad_reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(argmax, logits.argmax(-1))
