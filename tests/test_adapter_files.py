"""Loading refuses every damaged, foreign or inconsistent adapter by name, before the model is touched; the guards
of edit() (other base weights, runaway norms, contradictory or empty requests) refuse clearly and roll back.

Tiny random models only. Files are damaged two ways: bytes changed behind the manifest's back (caught by the
checksums), and contents rewritten *with* the manifest updated, as a careless tool would (caught by validating
every value)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hf_encore
from hf_encore import AdapterFileError, BaseModelMismatchError, EncoreConfig, NormRatioExceededError, get_encore_model
from hf_encore.layer import EncoreLayer
from hf_encore.save_transaction import MANIFEST

from tiny_models import TINY_D_K, deltas, tiny_adapter, tiny_llama

GOOD = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}
COUNTS = {"cases": 0, "refused": 0}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One full save (deltas, state, ledger) of a tiny adapter, copied fresh by each test that damages it."""
    out = tmp_path_factory.mktemp("saved") / "adapter"
    tiny_adapter(seed=3).save_pretrained(out)
    return out


@pytest.fixture
def adapter(saved, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "adapter"
    shutil.copytree(saved, copy)
    return copy


def rewrite(directory: Path, name: str, data: bytes) -> None:
    """Replace a file and update the manifest to match, so that only content validation can catch it."""
    (directory / name).write_bytes(data)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def rewrite_json(directory: Path, name: str, change) -> None:
    content = json.loads((directory / name).read_text())
    change(content)
    rewrite(directory, name, json.dumps(content).encode())


def rewrite_tensors(directory: Path, name: str, change) -> None:
    tensors = load_file(str(directory / name))
    change(tensors)
    tmp = directory / "tmp.safetensors"
    save_file(tensors, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    rewrite(directory, name, data)


def untouched(base) -> bool:
    return not any(isinstance(m, EncoreLayer) for m in base.modules())


def assert_refused(directory: Path, match: str, error=AdapterFileError) -> None:
    """Loading raises ``error`` matching ``match`` and leaves the base model without any wrapper."""
    base = tiny_llama(0)
    with pytest.raises(error, match=match):
        hf_encore.from_pretrained(base, directory)
    assert untouched(base)


def test_a_clean_save_loads_exactly(adapter):
    model = hf_encore.from_pretrained(tiny_llama(0), adapter)
    expected = tiny_adapter(seed=3)
    assert all(torch.equal(deltas(model)[k], v) for k, v in deltas(expected).items())
    assert model.base_model.edit_states["default"].num_edits == 11


FULL_SAVE = ["adapter_model.safetensors", "adapter_config.json", "encore_state.json", "encore_state.safetensors",
             "encore_ledger.jsonl", "README.md"]


@pytest.mark.parametrize("name,editing_state", [(name, True) for name in FULL_SAVE] + [
    (name, False) for name in ("adapter_model.safetensors", "adapter_config.json", "README.md")])
def test_a_flipped_byte_in_any_file_is_named(tmp_path, name, editing_state):
    out = tmp_path / "adapter"
    tiny_adapter(seed=3).save_pretrained(out, save_editing_state=editing_state)
    data = bytearray((out / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / name).write_bytes(bytes(data))
    assert_refused(out, f"{name}: its contents do not match the checksum")


@pytest.mark.parametrize("change,match", [
    (lambda m: m.update(num_edits=-5), "num_edits must be a non-negative integer, got -5"),
    (lambda m: m.update(num_batches="abc"), "num_batches must be a non-negative integer, got 'abc'"),
    (lambda m: m.update(num_edits=float("nan")), "num_edits must be a non-negative integer"),
    (lambda m: m.update(format_version="2"), "format_version must be a positive integer, got '2'"),
    (lambda m: m.update(format_version=2), "written by a newer hf_encore"),
    (lambda m: m.update(context_templates=["no placeholder"]), "context_templates"),
    (lambda m: m.update(stats_refs={"1": {"cache_key": 3}}), r"stats_refs\['1'\]"),
    (lambda m: m.update(prev_key_moments_dtype="int8"), "prev_key_moments_dtype"),
    (lambda m: m.clear(), "format_version"),
])
def test_state_json_values_are_validated(adapter, change, match):
    rewrite_json(adapter, "encore_state.json", change)
    assert_refused(adapter, "encore_state.json: " + match)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.__setitem__("prev_key_moments.1", t["prev_key_moments.1"].fill_(float("nan"))),
     "prev_key_moments.1 holds NaN"),
    (lambda t: t.__setitem__("prev_key_moments.1", torch.zeros(TINY_D_K + 1, TINY_D_K + 1, dtype=torch.float64)),
     r"prev_key_moments.1 has shape \(65, 65\), expected \(64, 64\)"),
    (lambda t: t.__setitem__("prev_key_moments.1", torch.zeros(3, 4, dtype=torch.float64)),
     "prev_key_moments.1 must be a square floating"),
    (lambda t: t.__setitem__("prev_key_moments.3", torch.zeros(TINY_D_K, TINY_D_K, dtype=torch.float64)),
     "layer 3, which the adapter does not edit"),
    (lambda t: t.__setitem__("c0.1", torch.eye(TINY_D_K)), "no statistics reference"),
    (lambda t: t.__setitem__("mystery", torch.zeros(1)), "unexpected tensor 'mystery'"),
])
def test_state_tensors_are_validated(adapter, change, match):
    rewrite_tensors(adapter, "encore_state.safetensors", change)
    assert_refused(adapter, "encore_state.safetensors: .*" + match)


def test_deltas_must_be_finite_and_fit_the_model(adapter):
    key = next(iter(load_file(str(adapter / "adapter_model.safetensors"))))
    rewrite_tensors(adapter, "adapter_model.safetensors", lambda t: t[key].view(-1).__setitem__(0, float("inf")))
    assert_refused(adapter, f"adapter_model.safetensors: tensor '{key}' holds NaN or infinite values")
    rewrite_tensors(adapter, "adapter_model.safetensors", lambda t: t.__setitem__(key, torch.zeros(32, 63)))
    assert_refused(adapter, r"adapter_model.safetensors: expected 2 deltas of shape \[\(32, 64\)\]")
    rewrite_tensors(adapter, "adapter_model.safetensors", lambda t: t.pop(key))
    assert_refused(adapter, "expected 2 deltas .* found 1")


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(peft_type="LORA"), "peft_type is 'LORA': this is not an hf_encore adapter"),
    (lambda c: c.update(v_lr="abc"), "v_lr"),
    (lambda c: c.update(method="rome"), "method"),
])
def test_config_is_validated_and_named(adapter, change, match):
    rewrite_json(adapter, "adapter_config.json", change)
    assert_refused(adapter, "adapter_config.json: .*" + match)


def test_ledger_lines_must_be_batch_records(adapter):
    rewrite(adapter, "encore_ledger.jsonl", b'{"batch": 1}\n')
    assert_refused(adapter, r"encore_ledger.jsonl: line 1 is not a batch record")
    rewrite(adapter, "encore_ledger.jsonl", b"[1, 2]\n")
    assert_refused(adapter, r"encore_ledger.jsonl: line 1 is not a batch record")


def test_own_files_not_in_the_manifest_are_from_another_save(adapter, tmp_path):
    other = tmp_path / "other"
    tiny_adapter(seed=4).save_pretrained(other, save_editing_state=False)
    (adapter / "encore_state.json").rename(tmp_path / "state.json")  # keep the listed one aside ...
    manifest = json.loads((other / MANIFEST).read_text())
    (adapter / MANIFEST).write_text(json.dumps(manifest))  # ... and pair the other save's manifest with these files
    (other / "encore_state.json").write_bytes((tmp_path / "state.json").read_bytes())
    assert_refused(other, "encore_state.json: not listed in encore_manifest.json")


def test_listed_names_cannot_leave_the_adapter_directory(adapter, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    manifest = json.loads((adapter / MANIFEST).read_text())
    manifest["files"]["../secret.txt"] = {"sha256": "0" * 64, "size": 9}
    (adapter / MANIFEST).write_text(json.dumps(manifest))
    assert_refused(adapter, "'../secret.txt', which is not a plain relative path")
    # A save from before manifests lists its checksums in encore_state.json: confined the same way.
    (adapter / MANIFEST).unlink()
    rewrite_state = json.loads((adapter / "encore_state.json").read_text())
    rewrite_state["sha256"] = {"../../../../../../etc/hostname": "0" * 64}
    (adapter / "encore_state.json").write_text(json.dumps(rewrite_state))
    assert_refused(adapter, "'../../../../../../etc/hostname', which is not a plain path inside")


@pytest.mark.parametrize("subfolder", ["../../..", "/etc", "a/../../b", ""])
def test_subfolder_must_stay_inside_the_repository(adapter, subfolder):
    with pytest.raises(AdapterFileError, match="must be a relative path inside"):
        hf_encore.from_pretrained(tiny_llama(0), adapter.parent, subfolder=subfolder)


def test_an_adapter_without_manifest_says_what_cannot_be_checked(adapter, caplog):
    for name in (MANIFEST, "encore_state.json", "encore_state.safetensors", "encore_ledger.jsonl"):
        (adapter / name).unlink()
    hf_encore.from_pretrained(tiny_llama(0), adapter)
    assert "has no checksums" in caplog.text and "structure and finite values only" in caplog.text


# ---- property-based: any rewritten value loads or is refused by name, never anything else ------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["encore_state.json", "adapter_config.json"]), key=st.data(), value=JSON_VALUES)
def test_any_rewritten_value_loads_or_is_refused_by_name(saved, tmp_path_factory, name, key, value):
    import shutil

    directory = tmp_path_factory.mktemp("prop") / "adapter"
    shutil.copytree(saved, directory)
    content = json.loads((directory / name).read_text())
    field = key.draw(st.sampled_from(sorted(content) + ["unknown_field"]))
    content[field] = value
    rewrite(directory, name, json.dumps(content).encode())
    base = tiny_llama(0)
    COUNTS["cases"] += 1
    try:
        hf_encore.from_pretrained(base, directory)
    except (AdapterFileError, BaseModelMismatchError) as err:
        COUNTS["refused"] += 1
        assert str(directory) in str(err) or isinstance(err, BaseModelMismatchError)
        assert untouched(base)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["adapter_model.safetensors", "adapter_config.json", "encore_state.json",
                             "encore_state.safetensors", "encore_ledger.jsonl", MANIFEST]),
       position=st.floats(0, 1, exclude_max=True), byte=st.integers(1, 255), truncate=st.booleans())
def test_any_damaged_byte_is_refused_by_name(saved, tmp_path_factory, name, position, byte, truncate):
    import shutil

    directory = tmp_path_factory.mktemp("bytes") / "adapter"
    shutil.copytree(saved, directory)
    data = bytearray((directory / name).read_bytes())
    at = int(position * len(data))
    data = data[:at] if truncate else data[:at] + bytes([data[at] ^ byte]) + data[at + 1:]
    original = (directory / name).read_bytes()
    (directory / name).write_bytes(bytes(data))
    COUNTS["cases"] += 1
    base = tiny_llama(0)
    if name == MANIFEST and same_json(original, bytes(data)):  # e.g. its final newline cut: nothing lost
        hf_encore.from_pretrained(base, directory)
        return
    with pytest.raises(AdapterFileError, match=str(directory)):
        hf_encore.from_pretrained(base, directory)
    COUNTS["refused"] += 1
    assert untouched(base)


def same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def test_report_counts():
    """Not a check: prints how many damaged adapters the properties above tried (shown with pytest -s)."""
    print(f"\nadapter-file properties: {COUNTS['cases']} cases, {COUNTS['refused']} refused by name, "
          f"{COUNTS['cases'] - COUNTS['refused']} loaded")


# ---- guards of attaching and editing ---------------------------------------------------------------------------


def test_other_weights_anywhere_in_the_base_are_named(adapter):
    base = tiny_llama(0)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight.mul_(1.001)  # below every edited layer
        base.model.embed_tokens.weight.add_(1e-3)
    with pytest.raises(BaseModelMismatchError, match=r"these parts differ: model.embed_tokens, model.layers.0 "
                                                     r"\(2 of \d+\)"):
        hf_encore.from_pretrained(base, adapter)
    assert untouched(base)
    model = hf_encore.from_pretrained(base, adapter, ignore_base_mismatch=True)
    assert model.base_model.edit_states["default"].num_edits == 11


def test_the_lm_head_and_final_norm_count_too(adapter):
    for part in ("lm_head", "model.norm"):
        base = tiny_llama(0)
        with torch.no_grad():
            base.get_submodule(part).weight.mul_(0.5)
        with pytest.raises(BaseModelMismatchError, match=f"these parts differ: {part} "):
            hf_encore.from_pretrained(base, adapter)


@pytest.fixture
def editable(tiny_tok):
    tokenizer = tiny_tok
    rng = random.Random(0)
    words = "the of and to in is was for on as with by he at from his an were are which this be or had".split()
    corpus = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(100)]
    config = EncoreConfig(method="memit", layers=[1, 2], stats_n_tokens=3000, n_context_templates=1,
                          v_num_grad_steps=3)
    return get_encore_model(tiny_llama(0, vocab_size=len(tokenizer)), config, tokenizer=tokenizer, corpus=corpus)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model, before):
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], v) for n, v in before.items())


AGGRESSIVE = dict(preservation_weight=1e-6, clamp_norm_factor=50, v_lr=20.0)  # ‖W‖/‖W₀‖ 5.0 and 2.5 here


def test_a_runaway_norm_warns_with_the_figure_and_the_settings(editable, caplog):
    report = editable.edit([GOOD], progress=False, **AGGRESSIVE)
    ratio = max(layer.weight_norm_ratio for layer in report.layers)
    assert ratio > 2.0
    assert f"is {ratio:.4g}" in caplog.text and "preservation_weight=1e-06 (default 1.0)" in caplog.text
    assert "max_norm_ratio" in caplog.text


def test_max_norm_ratio_refuses_the_batch_and_rolls_back(editable, caplog):
    editable.edit([GOOD], progress=False)
    before, state = weights(editable), editable.base_model.edit_states["default"]
    moments = {k: v.clone() for k, v in state.prev_key_moments.items()}
    with pytest.raises(NormRatioExceededError, match=r"above max_norm_ratio=1.2 \(likely from preservation_weight"):
        editable.edit([{**GOOD, "subject": "Tiger Woods"}], progress=False, max_norm_ratio=1.2, **AGGRESSIVE)
    assert_same(editable, before)
    assert state.num_edits == 1 and all(torch.equal(state.prev_key_moments[k], v) for k, v in moments.items())
    report = editable.edit([{**GOOD, "subject": "Tiger Woods"}], progress=False, max_norm_ratio=1.2)
    assert max(layer.weight_norm_ratio for layer in report.layers) <= 1.2


@pytest.mark.parametrize("batch,match", [
    ([GOOD, {**GOOD, "target_new": "golf"}], r"requests 0 and 1 ask for different targets \('football', 'golf'\)"),
    ([{**GOOD, "target_new": "<|endoftext|>"}], "request 0: the target '<|endoftext|>' has no text besides special"),
    ([{**GOOD, "target_new": " <|im_end|> "}], "has no text besides special"),
])
def test_contradictory_or_empty_targets_are_refused(editable, batch, match):
    before = weights(editable)
    with pytest.raises(ValueError, match=match.replace("|", r"\|") if "<|" in match else match):
        editable.edit(batch, progress=False)
    assert_same(editable, before)
    assert editable.base_model.edit_states["default"].num_edits == 0


def test_repeated_identical_requests_are_fine(editable):
    report = editable.edit([GOOD, dict(GOOD)], progress=False)
    assert len(report.requests) == 2 and math.isfinite(report.requests[0].p_target_after)


def test_an_undetermined_update_is_one_clear_error(tiny_tok):
    tokenizer = tiny_tok
    # One sentence repeated: C₀ has a handful of directions, and almost no regulariser covers the rest.
    config = EncoreConfig(method="memit", layers=[1, 2], stats_n_tokens=500, n_context_templates=1,
                          v_num_grad_steps=2)
    model = get_encore_model(tiny_llama(0, vocab_size=len(tokenizer)), config, tokenizer=tokenizer,
                             corpus=["hello world this is text"] * 200)
    before = weights(model)
    with pytest.raises(ValueError, match=r"layer 1: the update is not determined: C₀ \(from \d+ tokens\)"):
        model.edit([GOOD], progress=False, preservation_weight=1e-6)
    assert_same(model, before)
