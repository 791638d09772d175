"""Bases as people run them: bf16/fp16 weights, models dispatched by accelerate with CPU and disk offload, and
quantised W_out (bitsandbytes 8-bit and 4-bit on its CPU backend, and a stand-in for quantisations hf_encore cannot
read). Tiny random models; what is checked is that the edit is the one a float32 model on one device gets."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_encore
from hf_encore import EncoreConfig, get_encore_model
from hf_encore.apps.cli import main
from hf_encore.architectures import resolve_layout
from hf_encore.editing.tracing import ModelAccess
from hf_encore.fingerprint import base_parameters
from hf_encore.layer import Linear

from tiny_models import TINY_CORPUS, TINY_EDIT, TINY_LAYERS, deltas, tiny_family, tiny_tokenizer

REQUESTS = [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
            {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Paris"}]
# No early stopping, a fixed step count and no sampled context templates (half-precision logits sample other
# ones): the float32 and half-precision runs take the same steps on the same prompts, so their deltas can be
# compared entry by entry.
FIXED = dict(method="encore", mpes=False, v_num_grad_steps=5, stats_n_tokens=2000, n_context_templates=0)


def edited(model, stats_cache, **settings):
    config = EncoreConfig(layers=list(TINY_LAYERS), **{**FIXED, **settings})
    peft = get_encore_model(model, config, tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)
    report = peft.edit(REQUESTS, progress=False)
    return peft, report


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in b)


# ---- half precision ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_edits_like_float32(family, dtype, stats_cache):
    """The forward passes run in the base's dtype; z, keys and sums in float32/float64; deltas are float32. The
    result matches the float32 model's edit to half precision's rounding of the forward passes."""
    reference, _ = edited(tiny_family(family), stats_cache)
    base = tiny_family(family).to(dtype)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    half, report = edited(base, stats_cache)
    got = deltas(half)
    assert all(d.dtype == torch.float32 for d in got.values())
    assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in got.values())
    # fp16 keeps 11 bits of mantissa: the deltas differ by under 1 %. bf16 keeps 8, and Adam's first steps move
    # every coordinate of δ by ±lr whatever the size of its gradient, so where a gradient is near zero its
    # rounding picks the sign: the targets, and so the deltas, differ by about 10 % on these random models.
    assert relative_difference(got, deltas(reference)) < (0.25 if dtype == torch.bfloat16 else 0.02)
    assert all(0.5 < r.weight_norm_ratio < 2 for r in report.layers)
    base_after = base_parameters(half.get_base_model())
    # The base weights are never touched (a tied unembedding is checked as the embedding).
    assert all(torch.equal(base_after[k], v) for k, v in weights.items() if k in base_after)
    ids = tiny_tokenizer()("LeBron James plays", return_tensors="pt").input_ids
    with torch.no_grad():
        assert half(input_ids=ids).logits.dtype == dtype


def test_merge_into_bf16_rounds_once_and_unmerge_is_exact(stats_cache):
    peft, _ = edited(tiny_family("llama").to(torch.bfloat16), stats_cache)
    module = next(m for m in peft.modules() if isinstance(m, Linear))
    original = module.get_base_layer().weight.detach().clone()
    peft.merge_adapter()
    expected = (original.float() + module.encore_delta["default"]).to(torch.bfloat16)
    assert torch.equal(module.get_base_layer().weight, expected)
    peft.unmerge_adapter()
    assert torch.equal(module.get_base_layer().weight, original)


# ---- C₀ and S_prev storage ---------------------------------------------------------------------------------------

def test_moments_storage_dtype_default_follows_d_k():
    config = EncoreConfig()
    assert config.moments_storage_dtype(1536) == torch.float64
    assert config.moments_storage_dtype(14336) == torch.float32
    assert EncoreConfig(moments_dtype="float64").moments_storage_dtype(14336) == torch.float64
    with pytest.raises(ValueError, match="moments_dtype"):
        EncoreConfig(moments_dtype="float16")
    with pytest.raises(ValueError, match="moments_device"):
        EncoreConfig(moments_device="gpu")


def test_float32_moments_are_held_in_float32_and_edit_almost_alike(stats_cache):
    wide, _ = edited(tiny_family("llama"), stats_cache, moments_dtype="float64")
    narrow, _ = edited(tiny_family("llama"), stats_cache, moments_dtype="float32")
    state = narrow.base_model.edit_states["default"]
    assert all(m.dtype == torch.float32 for m in state.prev_key_moments.values())
    assert all(s.c0.dtype == torch.float32 for s in narrow.base_model.recorded_statistics("default").values())
    assert all(m.dtype == torch.float64 for m in wide.base_model.edit_states["default"].prev_key_moments.values())
    # The first batch solves with the same C₀ (float32 on disk either way): identical up to the solve's rounding.
    assert relative_difference(deltas(narrow), deltas(wide)) < 1e-6
    narrow.edit([{"prompt": "{} was developed by", "subject": "Windows 95", "target_new": "Apple"}], progress=False)
    wide.edit([{"prompt": "{} was developed by", "subject": "Windows 95", "target_new": "Apple"}], progress=False)
    assert relative_difference(deltas(narrow), deltas(wide)) < 1e-4  # S_prev rounded to float32 once


# ---- accelerate: dispatched and offloaded models -----------------------------------------------------------------

# Every kind of placement at once: edited layers (1, 2) offloaded to disk and kept on the CPU, a non-edited one on
# disk, the unembedding on disk.
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
              "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


def hooked(model: nn.Module) -> set[str]:
    """Modules whose forward accelerate has wrapped (by their names without PEFT's wrapper levels)."""
    names = {name.replace(".base_layer", "") for name, module in model.named_modules() if "forward" in module.__dict__}
    return {"" if name == "base_model.model" else name.removeprefix("base_model.model.") for name in names}


@pytest.fixture
def dispatched(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    def load(device_map=DEVICE_MAP):
        return AutoModelForCausalLM.from_pretrained(tiny_dir, device_map=device_map, offload_folder=tmp_path / "off")
    return load


def test_dispatched_and_offloaded_model_edits_like_the_undispatched_one(tiny_dir, dispatched, stats_cache):
    from transformers import AutoModelForCausalLM

    plain, plain_report = edited(AutoModelForCausalLM.from_pretrained(tiny_dir), stats_cache)
    model = dispatched()
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # really offloaded
    hooks = hooked(model)
    assert len(hooks) > 40
    peft, report = edited(model, stats_cache)
    assert hooked(peft) == hooks  # every accelerate hook kept through the edit's replays
    got, want = deltas(peft), deltas(plain)
    assert all(d.device.type == "cpu" for d in got.values())  # where the layer executes, never meta
    assert relative_difference(got, want) < 1e-5
    for mine, theirs in zip(report.layers, plain_report.layers):  # the norms read the offloaded weights
        assert mine.weight_norm_ratio == pytest.approx(theirs.weight_norm_ratio, rel=1e-6)
    tok = tiny_tokenizer()
    ids = tok("LeBron James plays the sport of", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        generated = peft.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(generated, plain.generate(input_ids=ids, max_new_tokens=8, do_sample=False))
        with peft.disable_adapter():  # apart from the edit, the model is unchanged
            base_logits = peft(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(base_logits, AutoModelForCausalLM.from_pretrained(tiny_dir)(input_ids=ids).logits)
        edited_logits = peft(input_ids=ids).logits
        peft.merge_adapter()  # into the offloaded weights, through PEFT's onloading
        torch.testing.assert_close(peft(input_ids=ids).logits, edited_logits, rtol=1e-4, atol=1e-4)
        peft.unmerge_adapter()
        assert torch.equal(peft(input_ids=ids).logits, edited_logits)
        with peft.disable_adapter():
            assert torch.equal(peft(input_ids=ids).logits, base_logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_every_family_fully_offloaded_edits_exactly_like_the_plain_model(family, offload, tmp_path, stats_cache):
    """accelerate's disk_offload / cpu_offload: every weight of the model is on ``meta`` between calls, loaded by
    its module's hook for each forward pass (tied unembeddings, Conv1D and post-MLP norms included)."""
    from accelerate import cpu_offload, disk_offload

    plain, _ = edited(tiny_family(family), stats_cache)
    model = tiny_family(family)
    if offload == "disk":
        disk_offload(model, tmp_path / "off", execution_device="cpu")
    else:
        cpu_offload(model, execution_device="cpu")
    hooks = hooked(model)
    offloaded, _ = edited(model, stats_cache)
    assert hooked(offloaded) == hooks
    assert relative_difference(deltas(offloaded), deltas(plain)) < 1e-6


def test_adapter_made_on_one_device_attaches_to_the_dispatched_model(tiny_dir, dispatched, stats_cache, tmp_path):
    """The base fingerprint reads offloaded tensors from accelerate's weights map: the same weights, dispatched or
    not, are the same base (and share the statistics cache)."""
    from transformers import AutoModelForCausalLM

    plain, _ = edited(AutoModelForCausalLM.from_pretrained(tiny_dir), stats_cache)
    plain.save_pretrained(tmp_path / "adapter")
    loaded = hf_encore.from_pretrained(dispatched(), tmp_path / "adapter", tokenizer=tiny_tokenizer())
    assert relative_difference(deltas(loaded), deltas(plain)) == 0
    assert loaded.base_model.statistics.base_fingerprint == plain.base_model.statistics.base_fingerprint
    loaded.edit([{"prompt": "{} was developed by", "subject": "Windows 95", "target_new": "Apple"}], progress=False,
                corpus=TINY_CORPUS)


def test_replay_puts_back_the_forward_a_block_had(stats_cache):
    """ModelAccess.replay_from swaps blocks' forward for the replay and restores what the instance had (accelerate
    keeps its hook wrapper there)."""
    model = tiny_family("llama")
    access = ModelAccess(model, resolve_layout(model))
    wrapper = model.model.layers[0].forward  # a bound method; stored on the instance as accelerate does
    model.model.layers[0].forward = wrapper
    with access.replay_from(1, torch.zeros(1, 3, 32)):
        assert model.model.layers[0].forward is not wrapper
    assert model.model.layers[0].__dict__["forward"] is wrapper
    assert "forward" not in model.model.layers[1].__dict__


# ---- quantised W_out ---------------------------------------------------------------------------------------------

class FakeQuantLinear(nn.Module):
    """A layer as a quantisation library makes it: int8 weight codes and a scale, a float output."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.abs().amax() / 127
        self.register_buffer("scale", scale)
        self.weight = nn.Parameter((linear.weight / scale).round().to(torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).T


def test_unreadable_quantised_w_out_is_refused_naming_its_type():
    model = tiny_family("llama")
    for layer in TINY_LAYERS:
        model.model.layers[layer].mlp.down_proj = FakeQuantLinear(model.model.layers[layer].mlp.down_proj)
    with pytest.raises(TypeError, match="FakeQuantLinear"):
        get_encore_model(model, EncoreConfig(layers=list(TINY_LAYERS)))


@pytest.fixture(scope="module")
def wide_tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama 64 wide: bitsandbytes' 4-bit CPU kernel needs every quantised layer's input width to be a
    multiple of its block size (64), and its output width of 32."""
    directory = tmp_path_factory.mktemp("wide-tiny")
    tiny_family("llama", hidden_size=64, d_k=128).save_pretrained(directory)  # W_out: 2 scale blocks per row
    tiny_tokenizer().save_pretrained(directory)
    return directory


def load_bnb(directory: Path, bits: str, **settings):
    pytest.importorskip("bitsandbytes", reason="the quantization extra (pip install hf_encore[quantization])")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else \
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **settings)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu")


@pytest.fixture(params=["8bit", "4bit"])
def bnb_model(request, wide_tiny_dir):
    return load_bnb(wide_tiny_dir, request.param)


def repack_for_cpu(module: nn.Module) -> None:
    """What bitsandbytes does to a 4-bit weight on the first inference forward on an AVX512-BF16 CPU, done here
    when this CPU has not (other CPUs never repack)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from hf_encore.quantized import repacked_for_cpu

    if not repacked_for_cpu(module):
        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
            module.weight.data, module.weight.quant_state)
    assert repacked_for_cpu(module)


def test_running_a_bitsandbytes_base_keeps_its_fingerprint(bnb_model):
    """Its first forward may repack 4-bit weights (above): an adapter must still attach to the model afterwards,
    and the statistics cache still find its C₀."""
    from hf_encore.fingerprint import measure_base

    layout = resolve_layout(bnb_model)
    before = measure_base(bnb_model, layout, TINY_LAYERS)
    with torch.no_grad():
        bnb_model(input_ids=tiny_tokenizer()("LeBron James plays", return_tensors="pt").input_ids)
    for module in bnb_model.modules():
        if type(module).__name__ == "Linear4bit":
            repack_for_cpu(module)
    assert measure_base(bnb_model, layout, TINY_LAYERS) == before


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_weight_repacked_for_the_cpu_kernel_reads_as_before(wide_tiny_dir, double_quant):
    """bitsandbytes 0.50+ rewrites a 4-bit weight into its CPU kernel's layout on the first inference forward on an
    AVX512-BF16 CPU (block scales kept in bf16): the dequantised weight must be the same matrix, to bf16 rounding
    of the scales, and the layer must compute with it."""
    from hf_encore.quantized import float_weight

    module = load_bnb(wide_tiny_dir, "4bit", bnb_4bit_use_double_quant=double_quant).model.layers[1].mlp.down_proj
    before = float_weight(module).clone()
    repack_for_cpu(module)
    assert module.weight.shape != before.shape
    after = float_weight(module)
    assert after.shape == before.shape
    assert torch.allclose(after, before, rtol=2 ** -8, atol=0)  # bf16 scales: 8 significant bits
    assert module.weight.quant_state.packing_format_for_cpu  # the module is left as it was


def test_bitsandbytes_base_edits_with_float_deltas_and_refuses_to_merge(bnb_model, stats_cache):
    from hf_encore.quantized import QuantizedMergeError, float_weight

    peft, report = edited(bnb_model, stats_cache, **TINY_EDIT)
    modules = {layer: peft.base_model.model.model.layers[layer].mlp.down_proj for layer in TINY_LAYERS}
    for layer_report in report.layers:
        module = modules[layer_report.layer]
        assert module.encore_delta["default"].dtype == torch.float32 and module.encore_delta["default"].any()
        w0 = float_weight(module.get_base_layer()).double()  # the dequantised weight, not the codes
        assert w0.is_floating_point() and w0.abs().max() < 10
        expected = float((w0 + module.encore_delta["default"].double()).norm() / w0.norm())
        assert layer_report.weight_norm_ratio == pytest.approx(expected, rel=1e-9)
    codes = {layer: m.get_base_layer().weight.detach().clone() for layer, m in modules.items()}
    ids = tiny_tokenizer()("LeBron James plays", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = peft(input_ids=ids).logits
        with peft.disable_adapter():
            assert not torch.allclose(peft(input_ids=ids).logits, adapted)  # the delta is applied
    with pytest.raises(QuantizedMergeError, match="quantised"):
        peft.merge_adapter()
    assert all(torch.equal(m.get_base_layer().weight, codes[layer]) for layer, m in modules.items())
    assert not any(m.merged for m in modules.values())


def test_a_copy_of_a_dispatched_model_keeps_its_hooks_private(dispatched):
    """Sanity for the hooks test above: ``hooked`` sees accelerate's wrappers and not a plain model's."""
    assert hooked(copy.deepcopy(tiny_family("llama"))) == set()
    assert "model.layers.1.mlp.down_proj" in hooked(dispatched())


def test_command_line_edits_a_bf16_model_dispatched_with_offload(tiny_dir, tmp_path, stats_cache):
    """``hf-encore edit --precision bfloat16 --device-map auto --offload-folder …``: the model is loaded in bf16 and
    dispatched by accelerate (with no accelerator here, "auto" places it on the CPU), and the adapter it writes holds
    float32 deltas that load onto the plain model."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "facts.json").write_text(json.dumps(REQUESTS))
    out = tmp_path / "edits"
    assert main(["edit", str(tmp_path / "facts.json"), "--model", str(tiny_dir), "--out", str(out), "--quiet",
                 "--corpus", str(tiny_dir / "corpus.txt"), "--precision", "bfloat16", "--device-map", "auto",
                 "--offload-folder", str(tmp_path / "off"), "--set", "stats_n_tokens=2000"]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    loaded = hf_encore.from_pretrained(base, out, tokenizer=tiny_tokenizer())
    assert all(d.dtype == torch.float32 and d.any() for d in deltas(loaded).values())
    assert main(["show", str(out)]) == 0


def test_a_model_cast_to_bf16_after_attaching_edits_into_float32_deltas(stats_cache):
    """``model.to(torch.bfloat16)`` casts the deltas with everything else; the next edit brings them back to
    float32 (warning that the cast rounded them) instead of accumulating updates in bf16."""
    peft, _ = edited(tiny_family("llama"), stats_cache)
    peft.to(torch.bfloat16)
    assert all(d.dtype == torch.bfloat16 for d in deltas(peft).values())
    with pytest.warns(UserWarning, match="cast to torch.bfloat16"):
        peft.edit([{"prompt": "{} was developed by", "subject": "Windows 95", "target_new": "Apple"}],
                  progress=False)
    assert all(d.dtype == torch.float32 for d in deltas(peft).values())
