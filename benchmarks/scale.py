"""Memory and time of one edit batch at Llama-3-8B's shape, on random weights (nothing is downloaded), per part of
the edit, for each dtype C₀ and S_prev are held in; next to the analytic memory model. Prints a table, writes JSON.

    python benchmarks/scale.py --out docs/results/scale-llama3-8b-shape.json                  # a GPU or a big host
    python benchmarks/scale.py --num-layers 4 --layers 1 2 --batch 2 --stats-tokens 1024 --z-steps 1 \\
        --moments-dtype float32 float64 --out docs/results/scale-llama3-8b-shape-cpu.json  # a 2-core, 24 GiB CPU

The model is a ``LlamaForCausalLM`` with Llama-3-8B's exact configuration (d = 4096, d_k = 14,336, 32 heads, 8 key/
value heads, vocabulary 128,256, untied embeddings), built on the ``meta`` device and materialised with
``normal_(0, 0.02)`` in ``--dtype`` (bfloat16), with ``--num-layers`` blocks (32 by default; fewer where memory or
time is short: every edited layer's matrices have the full shape, so C₀, S_prev and the solve, the parts this
benchmark is about, are those of the real model). Quality is meaningless on random weights; speed and memory are
not. The tokenizer is any offline one whose ids are below 128,256 (the built-in SmolLM2's by default); the requests
are CounterFact-train cases from 2000 on (as ``memory.py``); C₀ is measured on WikiText-2 validation text.

Each ``--moments-dtype`` is measured in a fresh process with a fresh statistics cache (so C₀ is computed each
time). The parts are delimited by wrapping the model-reading steps (``EditSteps``) and, by monkeypatching
``hf_encore.editing.pipeline``, the templates, the solve (``layer_update``) and the final p(target) pass:

    templates        context templates (model.generate)
    statistics       C₀: reading and tokenising the corpus; the pass (second_moments); rounding, the disk cache and
                     the conversion to moments_dtype (statistics_store)
    targets          the z-optimisation (step 1)
    keys             K and H per layer
    solve            layer_update: Λ = λ_p C₀ + S_prev, A = Λ + K Kᵀ, Cholesky, ΔW (float64)
    post_solve       S_prev += K Kᵀ, the delta update and ‖W‖/‖W₀‖
    p_after          p(target) on the edited model
    held             after edit() returns: C₀ and S_prev of every edited layer (and the deltas) stay

On a CPU the peak of each part is the process's resident set (VmHWM, reset before each part by writing 5 to
/proc/self/clear_refs); on CUDA the peak of allocated device memory (``torch.cuda.max_memory_allocated``, reset per
part) is reported too. GB are 10⁹ bytes. A configuration whose modelled peak does not fit in the memory available
now is skipped with the reason recorded (``--force`` runs it anyway). The JSON is rewritten after each
configuration, and a configuration already in ``--out`` with the same settings is not run again.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from common import corpus_path, counterfact_cases, edit_requests, machine, write_json, z_steps

FIRST_CASE = 2000  # counterfact-train cases from here on, as memory.py: never the reported edits
GB = 1e9

# meta-llama/Meta-Llama-3-8B's config.json (the fields that decide shapes and the forward pass).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                 tie_word_embeddings=False, num_hidden_layers=32, hidden_act="silu", attention_bias=False,
                 mlp_bias=False, initializer_range=0.02, bos_token_id=128000, eos_token_id=128001)
# A scaled-down shape to try this script out in seconds (not a measurement).
TINY = {**LLAMA3_8B, "hidden_size": 128, "intermediate_size": 448, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 10}
SHAPES = {"llama3-8b": LLAMA3_8B, "tiny": TINY}
PUBLISHED_LAYERS = [4, 5, 6, 7, 8]  # the ENCORE/MEMIT papers' edited layers for Llama-3-8B (critical layer 8)


# ---- memory readings -------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_gb() -> float:
    return _status_kb("VmRSS") * 1024 / GB


def hwm_gb() -> float:
    return _status_kb("VmHWM") * 1024 / GB


def reset_hwm() -> None:
    """Set the process's high-water mark of resident memory to its current resident set (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    raise KeyError("MemAvailable")


def mem_total_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024 / GB


class Parts:
    """Seconds and peak memory per part of the work: ``switch(name)`` closes the running part (its time, its peak
    resident set since it began, its CUDA peak) and starts ``name``. A part entered several times adds its seconds
    and keeps its largest peak."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.figures: dict[str, dict[str, float]] = {}
        self.order: list[str] = []
        self.current: str | None = None
        self.suffix = ""  # appended to every part's name (the batch, from the second on)
        self.start = 0.0
        self.base_rss = rss_gb()

    def switch(self, name: str | None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.current is not None:
            f = self.figures.setdefault(self.current, {"seconds": 0.0, "peak_rss_gb": 0.0, "calls": 0})
            if self.current not in self.order:
                self.order.append(self.current)
            f["seconds"] += now - self.start
            f["calls"] += 1
            f["peak_rss_gb"] = max(f["peak_rss_gb"], hwm_gb())
            if self.cuda:
                f["cuda_peak_gb"] = max(f.get("cuda_peak_gb", 0.0), torch.cuda.max_memory_allocated() / GB)
        reset_hwm()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.current, self.start = name, time.perf_counter()

    def wrap(self, function: Callable, name: str, after: str = "other") -> Callable:
        """``function``, run as part ``name``; what follows it, until the next wrapped call, is part ``after``."""
        def wrapped(*args, **kwargs):
            self.switch(name + self.suffix)
            try:
                return function(*args, **kwargs)
            finally:
                self.switch(after + self.suffix)
        return wrapped


# ---- the model -------------------------------------------------------------------------------------------------

def build_model(shape: dict, num_layers: int, dtype: torch.dtype, device: str, seed: int = 0):
    """A random-weight LlamaForCausalLM of ``shape`` with ``num_layers`` blocks, built on ``meta`` and materialised
    directly in ``dtype`` on ``device`` (no float32 copy, no initialisation pass over 8B parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, "num_hidden_layers": num_layers})
    config.torch_dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
        # Buffers (the rotary inverse frequencies) are not parameters: to_empty left them uninitialised.
        for module in model.modules():
            if hasattr(module, "inv_freq"):
                fresh = type(module)(config=config).to(device)
                module.inv_freq = fresh.inv_freq
                module.original_inv_freq = fresh.original_inv_freq
    model.config._name_or_path = f"random-llama3-8b-shape-{num_layers}-layers"
    return model.eval()


def parameter_count(shape: dict, num_layers: int) -> int:
    """Parameters of a Llama with ``shape`` and ``num_layers`` blocks (8,030,261,248 for Llama-3-8B's 32)."""
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return num_layers * block + v * d * (1 if shape["tie_word_embeddings"] else 2) + d


# ---- the analytic memory model ---------------------------------------------------------------------------------

def memory_model(shape: dict, num_layers: int, m: int, weight_bytes: int, moments_bytes: int,
                 device: str = "cpu", moments_device: str = "cpu") -> dict[str, float]:
    """What the code holds, in GB, for ``m`` edited layers (hf_encore/editing: stats.py, stats_cache.py, solve.py,
    pipeline.py), d_k = intermediate size, d_v = hidden size; activations (z-optimisation, keys) not included.

    weights            all parameters in the base dtype
    deltas             m float32 [d_v, d_k] deltas (edit() holds a second copy for the rollback)
    c0, s_prev         per layer, in the moments dtype (b bytes): b·d_k² each
    statistics_pass    above the model, during the C₀ pass: the float64 sums of every edited layer (8m·d_k²),
                       accumulated in place, and per batch K Kᵀ in float32 and in float64 (12·d_k²)
    statistics         the pass's peak or, if larger, after it: the sums normalised in place, each rounded to
                       float32 and freed in turn (8m + 4)·d_k²; on the host for every moments dtype and device
    solve_working      float64: Λ = λ_p C₀ + S_prev, then A = Λ + K Kᵀ in the same buffer, its Cholesky factor and
                       cholesky_solve's column-major copy of that factor (3·8·d_k²), the right-hand side R Kᵀ and
                       the solved copy (2·8·d_v·d_k)
    first_batch_solve  the first batch's solve of the top layer: C₀ of m layers, the new S_prev of m − 1, the
                       working set
    later_batch_solve  a later batch's: C₀ (m), S_prev (m) and the new S_prev (m − 1) both held until the commit,
                       the working set
    held               after the edit: C₀ + S_prev of m layers
    """
    d_k, d_v = shape["intermediate_size"], shape["hidden_size"]
    sq = d_k * d_k
    on_gpu = device.startswith("cuda")
    out = {
        "weights": parameter_count(shape, num_layers) * weight_bytes / GB,
        "deltas": m * d_v * d_k * 4 / GB,
        "c0_per_layer": moments_bytes * sq / GB,
        "s_prev_per_layer": moments_bytes * sq / GB,
        "statistics_pass": (8 * m + 12) * sq / GB,
        "statistics": max(8 * m + 12, 8 * m + 4) * sq / GB,
        "solve_working": (3 * 8 * sq + 2 * 8 * d_v * d_k) / GB,
    }
    out["held"] = 2 * m * out["c0_per_layer"]
    out["first_batch_solve"] = (2 * m - 1) * out["c0_per_layer"] + out["solve_working"]
    out["later_batch_solve"] = (3 * m - 1) * out["c0_per_layer"] + out["solve_working"]
    # The host's share (what must fit in RAM): the statistics pass always sums on the host in float64.
    host_model = 0.0 if on_gpu else out["weights"] + 2 * out["deltas"]
    host_moments = 0.0 if on_gpu and moments_device == "layer" else 1.0
    out["host_peak_first_batch"] = host_model + max(
        out["statistics"], host_moments * out["first_batch_solve"])
    out["host_held"] = (0.0 if on_gpu else out["weights"] + out["deltas"]) + host_moments * out["held"]
    if on_gpu:
        gpu_moments = 1.0 - host_moments
        out["gpu_peak_first_batch"] = out["weights"] + 2 * out["deltas"] + gpu_moments * out["first_batch_solve"]
    return out


def model_rows(shape: dict, num_layers: int, m: int, weight_bytes: int) -> list[dict]:
    return [{"moments_dtype": name, "layers_edited": m, "num_layers": num_layers,
             **memory_model(shape, num_layers, m, weight_bytes, size)}
            for name, size in (("float64", 8), ("float32", 4))]


# ---- one configuration, in this process ------------------------------------------------------------------------

def measure(args: argparse.Namespace, moments_dtype: str) -> dict[str, Any]:
    from hf_encore import EncoreConfig, get_encore_model
    from hf_encore.editing import pipeline
    from hf_encore.editing.pipeline import EditSteps
    from hf_encore.loading import load_tokenizer

    cuda = args.device.startswith("cuda")
    parts = Parts(cuda)
    parts.switch("build")
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    base = build_model(SHAPES[args.shape], args.num_layers, dtype, args.device, args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > SHAPES[args.shape]["vocab_size"]:
        raise SystemExit(f"tokenizer {args.tokenizer} has {len(tokenizer)} ids, above the vocabulary")
    parts.switch("adapter")
    settings = dict(method=args.method, layers=args.layers, moments_dtype=moments_dtype,
                    moments_device=args.moments_device, stats_n_tokens=args.stats_tokens)
    if args.z_steps is not None:
        settings["v_num_grad_steps"] = args.z_steps
    if args.max_tokens is not None:
        settings["max_tokens_per_forward"] = args.max_tokens
    model = get_encore_model(base, EncoreConfig(**settings), tokenizer=tokenizer, corpus=corpus_path())
    requests = edit_requests(counterfact_cases(first=FIRST_CASE, count=args.batch))
    parts.switch("idle")
    gc.collect()

    steps = EditSteps()
    steps = EditSteps(
        optimise_targets=parts.wrap(steps.optimise_targets, "targets"),
        key_pass_inputs=parts.wrap(steps.key_pass_inputs, "keys"),
        keys_and_outputs=parts.wrap(steps.keys_and_outputs, "keys"),
        second_moments=parts.wrap(steps.second_moments, "statistics_pass", "statistics_store"))
    patched = {"generate_context_templates": ("templates", "statistics"), "layer_update": ("solve", "post_solve"),
               "target_probabilities": ("p_after", "commit")}
    originals = {name: getattr(pipeline, name) for name in patched}
    rss_before = rss_gb()
    reports = []
    try:
        for name, (part, after) in patched.items():
            setattr(pipeline, name, parts.wrap(originals[name], part, after))
        for batch in range(args.batches):
            # A later batch (part names "<part>#2", ...) edits the same requests again, with S_prev present: its
            # memory and time are those of any later batch.
            parts.suffix = f"#{batch + 1}" if batch else ""
            parts.switch("prelude" + parts.suffix)
            reports.append(model.edit(requests, progress=False, steps=steps))
    finally:
        for name, function in originals.items():
            setattr(pipeline, name, function)
    parts.switch(None)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()

    tuner = model.base_model
    state = tuner.edit_states["default"]
    c0 = {layer: s.c0 for layer, s in tuner.statistics.loaded.items()}
    held = {
        "c0_bytes": sum(t.numel() * t.element_size() for t in c0.values()),
        "c0_dtype": str(next(iter(c0.values())).dtype).replace("torch.", ""),
        "c0_device": str(next(iter(c0.values())).device),
        "s_prev_bytes": sum(t.numel() * t.element_size() for t in state.prev_key_moments.values()),
        "s_prev_dtype": str(next(iter(state.prev_key_moments.values())).dtype).replace("torch.", ""),
        "rss_before_edit_gb": rss_before,
        "rss_after_edit_gb": rss_gb(),
    }
    held["rss_growth_gb"] = held["rss_after_edit_gb"] - held["rss_before_edit_gb"]
    if cuda:
        held["cuda_allocated_after_edit_gb"] = torch.cuda.memory_allocated() / GB
    report = reports[0]
    return {
        "parts": {name: parts.figures[name] for name in parts.order},
        "library_seconds": [r.seconds for r in reports],
        "seconds_per_edit": report.seconds["total"] / args.batch,
        "z_steps": z_steps(report),
        "held": held,
        "max_norm_ratio": max(x.weight_norm_ratio for x in report.layers),
        "tokenizer_size": len(tokenizer),
        "threads": torch.get_num_threads(),
    }


# ---- the parent: configurations, resume, table -----------------------------------------------------------------

def run_key(args: argparse.Namespace, moments_dtype: str) -> dict[str, Any]:
    return {"shape": args.shape, "num_layers": args.num_layers, "layers": args.layers, "batch": args.batch,
            "batches": args.batches, "dtype": args.dtype, "moments_dtype": moments_dtype,
            "moments_device": args.moments_device, "device": args.device, "stats_tokens": args.stats_tokens,
            "z_steps": args.z_steps, "method": args.method, "max_tokens": args.max_tokens,
            "tokenizer": args.tokenizer}


def summary_row(run: dict, batch: int = 1) -> dict[str, Any]:
    """The table's figures of one run's ``batch``: per part seconds and peak (GB), the held state, s/edit."""
    suffix = f"#{batch}" if batch > 1 else ""
    p = {name[: len(name) - len(suffix)]: f for name, f in run["result"]["parts"].items()
         if (name.endswith(suffix) if suffix else "#" not in name)}
    p["idle"] = run["result"]["parts"]["idle"]

    def peak(*names: str) -> float:
        return max((p[n]["peak_rss_gb"] for n in names if n in p), default=float("nan"))

    def seconds(*names: str) -> float:
        return sum(p[n]["seconds"] for n in names if n in p)

    def cuda(*names: str) -> float | None:
        values = [p[n]["cuda_peak_gb"] for n in names if n in p and "cuda_peak_gb" in p[n]]
        return max(values) if values else None

    groups = {"statistics": ("statistics", "statistics_pass", "statistics_store"), "targets": ("targets",),
              "keys": ("keys",), "solve": ("solve", "post_solve"), "p_after": ("p_after",)}
    row = {"moments_dtype": run["key"]["moments_dtype"], "batch": batch, "base_rss_gb": p["idle"]["peak_rss_gb"]}
    for group, names in groups.items():
        row[f"{group}_peak_gb"] = peak(*names)
        row[f"{group}_s"] = seconds(*names)
        if cuda(*names) is not None:
            row[f"{group}_cuda_peak_gb"] = cuda(*names)
    held = run["result"]["held"]
    row["held_gb"] = (held["c0_bytes"] + held["s_prev_bytes"]) / GB
    row["rss_growth_gb"] = held["rss_growth_gb"]
    row["s_per_edit"] = run["result"]["library_seconds"][batch - 1]["total"] / run["key"]["batch"]
    # The model's figures on the measured baseline (the process when the edit starts: model, deltas, their
    # rollback copy, the interpreter; from the second batch on also C₀ and S_prev).
    mdl, m = run.get("modelled"), len(run["key"]["layers"])
    if mdl and "prelude" in p:
        start = p["prelude"]["peak_rss_gb"]
        row["modelled_weights_deltas_gb"] = mdl["weights"] + mdl["deltas"]
        row["modelled_statistics_peak_gb"] = start + mdl["statistics"] if batch == 1 else float("nan")
        row["modelled_solve_peak_gb"] = start + (mdl["first_batch_solve"] if batch == 1 else
                                                 (m - 1) * mdl["s_prev_per_layer"] + mdl["solve_working"])
        row["modelled_held_gb"] = mdl["held"]
    return row


def print_table(runs: list[dict], models: dict[str, dict]) -> None:
    cols = [("statistics", "C₀ pass"), ("targets", "z-opt"), ("keys", "keys"), ("solve", "solve")]
    head = f"{'moments':<9}{'batch':>6}{'model':>7}" + "".join(f"{label:>16}" for _, label in cols) + \
        f"{'held (C₀+S)':>13}{'RSS growth':>12}{'s/edit':>8}"
    print("\npeak RSS GB (seconds) per part; held = bytes of C₀ + S_prev after the edit")
    print(head)
    for run in runs:
        if run.get("skipped"):
            print(f"{run['key']['moments_dtype']:<9} skipped: {run['skipped']}")
            continue
        for batch in range(1, run["key"]["batches"] + 1):
            r = summary_row(run, batch)
            print(f"{r['moments_dtype']:<9}{batch:>6}{r['base_rss_gb']:>7.2f}"
                  + "".join(f"{r[f'{g}_peak_gb']:>8.2f} ({r[f'{g}_s']:>5.0f})" for g, _ in cols)
                  + f"{r['held_gb']:>13.2f}{r['rss_growth_gb']:>12.2f}{r['s_per_edit']:>8.1f}")
            if "modelled_solve_peak_gb" in r:
                print(f"{'  modelled':<15}{r['modelled_weights_deltas_gb']:>7.2f}"
                      f"{r['modelled_statistics_peak_gb']:>8.2f}{'':>8}{'':>16}{'':>16}"
                      f"{r['modelled_solve_peak_gb']:>8.2f}{'':>8}{r['modelled_held_gb']:>13.2f}")
    print("(modelled: weights + deltas; the edit's starting RSS plus the model's statistics and first-batch solve "
          "figures; C₀ + S_prev)")
    print("\nmodelled GB (this run's shape): weights, deltas, C₀/layer, statistics above model, solve working set, "
          "first-batch solve, held")
    for name, mdl in models.items():
        print(f"{name:<9}" + "  ".join(f"{k} {mdl[k]:.2f}" for k in (
            "weights", "deltas", "c0_per_layer", "statistics", "solve_working", "first_batch_solve", "held")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b",
                   help="llama3-8b (the measurement) or tiny (to try the script out)")
    p.add_argument("--num-layers", type=int, default=32, help="blocks of the random model (Llama-3-8B: 32)")
    p.add_argument("--layers", type=int, nargs="+", default=PUBLISHED_LAYERS, help="edited layers (last: critical)")
    p.add_argument("--batch", type=int, default=100, help="requests in the edit batch")
    p.add_argument("--batches", type=int, default=1,
                   help="edit batches in a row (from the second on, S_prev exists: the steady state)")
    p.add_argument("--dtype", default="bfloat16", help="the base model's dtype")
    p.add_argument("--moments-dtype", nargs="+", action="extend", choices=["float64", "float32"],
                   help="dtypes C₀ and S_prev are held in, one run each (repeatable; default: both)")
    p.add_argument("--moments-device", choices=["cpu", "layer"], default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="encore")
    p.add_argument("--stats-tokens", type=int, default=None, help="C₀ tokens (default: the library's 10·d_k)")
    p.add_argument("--z-steps", type=int, default=None, help="z-optimisation step budget (default: the method's)")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens_per_forward (default: the library's)")
    p.add_argument("--tokenizer", default="smollm2-135m", help="any offline tokenizer with ids below 128,256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margin-gb", type=float, default=2.0,
                   help="skip a configuration whose modelled host peak is not this far below MemAvailable")
    p.add_argument("--force", action="store_true", help="run configurations the memory check would skip")
    p.add_argument("--out", type=Path, default=Path("scale.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)  # one moments dtype, measured in this process
    args = p.parse_args()
    args.moments_dtype = list(dict.fromkeys(args.moments_dtype or ["float64", "float32"]))
    if args.child:
        print(json.dumps(measure(args, args.child)), flush=True)
        return

    shape = SHAPES[args.shape]
    weight_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    models = {name: memory_model(shape, args.num_layers, len(args.layers), weight_bytes, size, args.device,
                                 args.moments_device)
              for name, size in (("float64", 8), ("float32", 4))}
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = [r for r in previous.get("runs", []) if not r.get("skipped")]
    for run in runs:  # the memory model as this version of the script has it
        if run["key"]["shape"] == args.shape and run["key"]["num_layers"] == args.num_layers and \
                run["key"]["layers"] == args.layers and "result" in run:
            run["modelled"] = models[run["key"]["moments_dtype"]]
    command = " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])
    start_all = time.perf_counter()

    def save() -> None:
        results = {
            "command": command, "machine": machine(args.device) + f", {mem_total_gb():.1f} GB RAM",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "shape": {**shape, "num_hidden_layers": args.num_layers}, "parameters": parameter_count(
                shape, args.num_layers),
            "notes": {
                "gb": "10^9 bytes",
                "peaks": "absolute resident set of the process (VmHWM per part, reset before each part); the model "
                         "and everything else held are included: compare with the 'idle' part (after building "
                         "the model and the adapter)",
                "quality": "random weights: p(target), norms and MPES stops are meaningless; memory and time are not",
            },
            "memory_model": {"this_shape": models,
                             "llama3_8b_full_depth_5_layers": {
                                 name: memory_model(LLAMA3_8B, 32, 5, 2, size)
                                 for name, size in (("float64", 8), ("float32", 4))},
                             "llama3_8b_full_depth_5_layers_cuda_moments_on_gpu": {
                                 name: memory_model(LLAMA3_8B, 32, 5, 2, size, "cuda", "layer")
                                 for name, size in (("float64", 8), ("float32", 4))},
                             "doc": memory_model.__doc__},
            "runs": runs,
        }
        write_json(args.out, results, indent=1)

    for moments_dtype in args.moments_dtype:
        key = run_key(args, moments_dtype)
        if any(r["key"] == key and "result" in r for r in runs):
            print(f"moments {moments_dtype}: already in {args.out}, not run again")
            continue
        runs = [r for r in runs if r["key"] != key]
        modelled = models[moments_dtype]["host_peak_first_batch"] + 1.0  # + the interpreter, torch, activations
        available = mem_available_gb()
        if not args.force and modelled > available - args.margin_gb:
            reason = (f"modelled host peak {modelled:.1f} GB does not fit: {available:.1f} GB available now, "
                      f"margin {args.margin_gb} GB (fewer --layers or --num-layers, or --force)")
            print(f"moments {moments_dtype}: skipped, {reason}", flush=True)
            runs.append({"key": key, "skipped": reason})
            save()
            continue
        print(f"moments {moments_dtype}: running (modelled host peak {modelled:.1f} GB, {available:.1f} GB "
              "available)", flush=True)
        cache = tempfile.mkdtemp(prefix="hf-encore-scale-")  # a fresh statistics cache: C₀ is measured each time
        child = [sys.executable, __file__, *sys.argv[1:], "--child", moments_dtype]
        started = time.perf_counter()
        try:  # on SIGTERM too: the cache holds m float32 [d_k, d_k] files (0.8 GB each at d_k = 14,336)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))
            done = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "HF_ENCORE_CACHE": cache})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if done.returncode != 0:
            sys.exit(f"moments {moments_dtype} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        run = {"key": key, "wall_seconds": time.perf_counter() - started, "modelled": models[moments_dtype],
               "result": json.loads(done.stdout.strip().splitlines()[-1])}
        runs.append(run)
        save()
        r = summary_row(run)
        print(f"moments {moments_dtype}: done in {run['wall_seconds']:.0f} s; "
              + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if isinstance(v, float)), flush=True)
    save()
    wanted = [run_key(args, d) for d in args.moments_dtype]
    print_table([r for r in runs if r["key"] in wanted], models)
    print(f"\n{time.perf_counter() - start_all:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
