"""Export to a standard PEFT LoRA adapter: exact at the numerical rank, truncated with the error reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from hf_encore import EncoreConfig, get_encore_model
from hf_encore.apps.cli import main
from hf_encore.lora_export import EXPORT_REPORT, lora_factors

from tiny_models import TINY_CORPUS, TINY_EDIT, TINY_LAYERS, save_tiny_model, tiny_family, tiny_tokenizer

FACTS = [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"},
         {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Paris"},
         {"prompt": "{} plays the sport of", "subject": "Serena Williams", "target_new": "golf"}]


def test_factors_reproduce_a_low_rank_delta_and_truncation_reports_its_error():
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(32, 3, generator=g) @ torch.randn(3, 64, generator=g)).float()
    a, b, exact, error = lora_factors(delta)
    assert exact == 3 and a.shape == (3, 64) and b.shape == (32, 3) and error < 1e-6  # float32 noise beyond
    torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-6)
    a, b, _, error = lora_factors(delta, rank=2)
    s = torch.linalg.svdvals(delta.double())
    assert error == pytest.approx(float(s[2] / s.norm()), rel=1e-9)
    assert float((b @ a - delta).norm() / delta.norm()) == pytest.approx(error, rel=1e-4)
    a, b, exact, error = lora_factors(torch.zeros(4, 5))
    assert exact == 0 and a.shape == (1, 5) and not b.any() and error == 0.0


def edited(family: str):
    model = get_encore_model(tiny_family(family), EncoreConfig(layers=list(TINY_LAYERS), **TINY_EDIT),
                             tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)
    model.edit(FACTS[:2], progress=False)
    model.edit(FACTS[2:], progress=False)  # a second batch: the delta is a sum of updates
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: a Conv1D W_out (fan_in_fan_out)
def test_plain_peft_loads_the_lora_export_with_the_adapters_outputs(family, stats_cache, tmp_path):
    model = edited(family)
    report = model.to_lora(tmp_path / "lora")
    assert [x.rank for x in report] == [x.numerical_rank for x in report]
    assert all(1 <= x.rank <= len(FACTS) and x.relative_error < 1e-6 for x in report)
    ids = tiny_tokenizer()("LeBron James plays the sport of", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        lora = PeftModel.from_pretrained(tiny_family(family), tmp_path / "lora")
        assert lora.peft_config["default"].peft_type.value == "LORA"
        got = lora(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tiny_family(family)(input_ids=ids).logits, expected, atol=1e-5)
    written = json.loads((tmp_path / "lora" / EXPORT_REPORT).read_text())
    assert [x["rank"] for x in written["layers"]] == [x.rank for x in report]


def test_a_smaller_rank_truncates_and_reports_the_error(stats_cache, tmp_path):
    model = edited("llama")
    report = model.to_lora(tmp_path / "lora", rank=1)
    assert all(x.rank == 1 and x.numerical_rank > 1 and x.relative_error > 1e-3 for x in report)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 1


def test_export_never_writes_into_a_non_empty_directory(stats_cache, tmp_path):
    model = edited("llama")
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        model.to_lora(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.slow  # a fresh interpreter: 10 s
def test_the_lora_export_loads_in_a_process_that_never_imports_hf_encore(stats_cache, tmp_path):
    base_dir = save_tiny_model(tmp_path / "base")
    from hf_encore import from_pretrained, load_model

    model = get_encore_model(load_model(str(base_dir))[0], EncoreConfig(layers=list(TINY_LAYERS), **TINY_EDIT),
                             tokenizer=tiny_tokenizer(), corpus=TINY_CORPUS)
    model.edit(FACTS, progress=False)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--lora",
                 str(tmp_path / "lora")]) == 0
    ids = tiny_tokenizer()("LeBron James plays the sport of", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = from_pretrained(load_model(str(base_dir))[0], tmp_path / "adapter")(input_ids=ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
data = torch.load({str(tmp_path / 'expected.pt')!r})
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(tmp_path / 'lora')!r})
with torch.no_grad():
    torch.testing.assert_close(model(input_ids=data["ids"]).logits, data["expected"], rtol=1e-5, atol=1e-5)
assert not any(name.startswith("hf_encore") for name in sys.modules), "hf_encore was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.slow  # the real model: knowledge edits have the delta ranks LoRA export is for
def test_lora_export_of_real_edits_reproduces_the_adapter(smollm2_dir, smollm2, tokenizer, cases, corpus_path,
                                                          tmp_path):
    from hf_encore.loading import load_model

    model = get_encore_model(smollm2, EncoreConfig(), tokenizer=tokenizer, corpus=corpus_path)
    requests = [{k: c[k] for k in ("prompt", "subject", "target_new")} for c in cases[:6]]
    model.edit(requests[:3], progress=False)  # two batches: the delta is a sum of two solves
    model.edit(requests[3:], progress=False)
    report = model.to_lora(tmp_path / "lora")
    assert all(x.rank == x.numerical_rank <= 6 and x.relative_error < 1e-5 for x in report)
    prompts = [c["prompt"].replace("{}", c["subject"]) for c in cases[:6]]
    lora = PeftModel.from_pretrained(load_model(str(smollm2_dir))[0], tmp_path / "lora")
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            torch.testing.assert_close(lora(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
