"""Which setting moves lifelong degradation: sequential ENCORE runs on counterfact-train, one factor at a time.

    python benchmarks/degradation_ablation.py --model smollm2-135m --edits 300 --jobs 2 \\
        --out runs/ablation-smollm2 --json docs/results/degradation-ablation-smollm2.json

Each configuration is a lifelong run (``hf_encore.apps.lifelong``) of ``--edits`` sequential ENCORE edits drawn from
counterfact-train, with perplexity (held-out WikiText-2 test), retained knowledge (200 counterfact-train facts the
unedited model knew, never edited) and ES/PS/NS of a sample of the facts edited so far measured every
``--eval-every`` edits, and ES/PS/NS of every edited fact at the end.
The reported edit set (counterfact-edit) is never used. Downstream tasks and fluency are left out: they cost more
than the edits here and the lifelong runs in docs/results.md measure them.

Runs are resumable (run the same command again: each continues where it stopped) and ``--jobs`` of them run at
once, each in its own process with ``--threads`` threads (one by default). ``--json`` collects every run's
evaluations, and ``--plots`` draws perplexity and retained knowledge against edits for every configuration.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hf_encore.jsonl import read_jsonl

from common import corpus_path, data_path, machine, write_json

# name → (EncoreConfig settings, lifelong options), each changing the baseline below. "defaults" is the baseline itself.
CONFIGURATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "defaults": ({}, {}),
    "c0-61k": ({"stats_n_tokens": 61_440}, {}),  # 4× the default 10·d_k statistics tokens
    "c0-200k": ({"stats_n_tokens": 200_000}, {}),  # most of WikiText-2 valid
    "generated-c0": ({}, {"corpus": "generated"}),  # the zero-configuration path: C₀ from model-generated text
    "preservation-2": ({"preservation_weight": 2.0}, {}),
    "preservation-4": ({"preservation_weight": 4.0}, {}),
    "preservation-8": ({"preservation_weight": 8.0}, {}),
    "norm-0.2": ({"norm_weight": 0.2}, {}),
    "norm-0.01": ({"norm_weight": 0.01}, {}),
    "layers-10": ({"layers": list(range(4, 14))}, {}),  # twice the default band 4-8, same start
    "mpes-k0": ({"mpes_extra_steps": 0}, {}),
    "mpes-k5": ({"mpes_extra_steps": 5}, {}),  # targets pushed further past the first correct step
    "batch-25": ({}, {"batch_size": 25}),
    # C₀ from WikiText-2 valid with short factual statements between its paragraphs (factual_corpus)
    "factual-c0": ({}, {"corpus": "factual"}),
    # the library's ENCORE defaults: C₀ from its rule (stats_n_tokens None → 40·d_k of a corpus) at λ_p 1
    "c0-rule": ({"stats_n_tokens": None}, {}),
    # the same C₀ with λ_p 2: the defaults for a while, under the name their runs were made with
    "new-defaults": ({"preservation_weight": 2.0, "stats_n_tokens": None}, {}),
}


@functools.cache  # read once per model: every command and the JSON ask for it
def baseline(model: str) -> dict[str, Any]:
    """hf_encore's ENCORE defaults when this ablation began, written out: the settings it went on to change keep the
    values they had then (λ_p 1; C₀ from max(10,000, 10·d_k) tokens), so every configuration means what it meant
    when it ran."""
    from transformers import AutoConfig

    from common import model_directory

    config = AutoConfig.from_pretrained(model_directory(model))
    d_k = getattr(getattr(config, "text_config", config), "intermediate_size", None)
    if not d_k:
        raise SystemExit(f"{model}: no intermediate_size in its config to size the baseline C₀ from")
    return {"preservation_weight": 1.0, "stats_n_tokens": max(10_000, 10 * d_k)}


FACTUAL_CORPUS = "factual-corpus.txt"  # in --out, written by factual_corpus before the first run that uses it


def factual_corpus(args: argparse.Namespace, probe: list[dict[str, Any]]) -> Path:
    """``<out>/factual-corpus.txt``: WikiText-2 valid's paragraphs with lines of counterfact-train statements
    between them, about half of the characters each, so that any prefix C₀ reads holds both.

    A statement is a case's prompt, or its paraphrase, followed by the true object ("Toko Yasuda, the guitar."),
    eight to a line. Probe facts and the facts a run of ``--edits`` edits would edit are left out, so retained
    knowledge still measures facts C₀ never saw. Why: the controls found the updates disturbing the MLP output on
    short subject-led factual prompts 1.4–2.3× more than on WikiText, keys that generic paragraphs rarely hold.
    """
    from hf_encore.apps.lifelong import LifelongSettings, choose_edits
    from hf_encore.data import load_counterfact
    from hf_encore.editing.corpus import fact_statements, interleave_texts

    target = Path(args.out) / FACTUAL_CORPUS
    if target.is_file():
        return target
    train = data_path("counterfact", "counterfact-train.json")
    cases = load_counterfact(train)
    seed = LifelongSettings.seed  # the default seed: the lifelong runs' draw of the edits
    left_out = {c["case_id"] for c in probe} | {c["case_id"] for c in choose_edits(cases, probe, args.edits, seed)}
    facts = [case for case in cases if case["case_id"] not in left_out]
    generic = [line.strip() for line in corpus_path().read_text(encoding="utf-8").splitlines()]
    lines = interleave_texts(fact_statements(facts), generic)
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def uses_factual_corpus(name: str) -> bool:
    return parse_combination(name)[1].get("corpus") == "factual"


def command(name: str, args: argparse.Namespace) -> list[str]:
    settings, options = parse_combination(name)
    settings = {**baseline(args.model), **settings}
    train = str(data_path("counterfact", "counterfact-train.json"))
    cmd = [sys.executable, "-m", "hf_encore.apps.lifelong", "--model", args.model, "--methods", "encore",
           "--data", train, "--probe-data", train, "--edits", str(args.edits),
           "--batch-size", str(options.get("batch_size", args.batch_size)), "--eval-every", str(args.eval_every),
           "--out", str(Path(args.out) / name), "--tasks", "--fluency-sample", "0", "--no-progress",
           "--perplexity-tokens", str(args.perplexity_tokens), "--edited-sample", str(args.edited_sample),
           "--known-facts", str(args.known_facts), "--precision", args.dtype]
    if "corpus" in options:
        corpus = options["corpus"]
        cmd += ["--corpus", str(Path(args.out) / FACTUAL_CORPUS) if corpus == "factual" else corpus]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def parse_combination(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings and options of configuration ``name``; ``"a+b"``: those of ``a`` and ``b`` together."""
    settings: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for part in name.split("+"):
        if part not in CONFIGURATIONS:
            raise SystemExit(f"unknown configuration {part!r}; known: {', '.join(CONFIGURATIONS)}")
        settings.update(CONFIGURATIONS[part][0])
        options.update(CONFIGURATIONS[part][1])
    return settings, options


SHARED = ("probe_facts.json", "unedited.json")  # the same for every configuration: measured once


def run_all(names: list[str], args: argparse.Namespace) -> None:
    """Run the configurations, ``args.jobs`` at a time, each logging to ``<out>/<name>.log``.

    The first configuration runs alone until it has chosen the probe facts and measured the unedited model; the
    others start from copies of those files instead of measuring the same model again.
    """
    pending = list(names)
    running: dict[str, subprocess.Popen] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    first = Path(args.out) / names[0]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    while pending or running:
        shared_ready = all((first / f).is_file() for f in SHARED)
        while pending and len(running) < args.jobs and (shared_ready or not running):
            name = pending.pop(0)
            folder = Path(args.out) / name
            if shared_ready and folder != first:
                folder.mkdir(exist_ok=True)
                for f in SHARED:
                    if not (folder / f).is_file():
                        shutil.copyfile(first / f, folder / f)
            if uses_factual_corpus(name):
                factual_corpus(args, json.loads((first / "probe_facts.json").read_text()))
            log = open(Path(args.out) / f"{name}.log", "a")
            print(f"starting {name}", flush=True)
            running[name] = subprocess.Popen(command(name, args), stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(5)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"{name} ended with code {proc.returncode}", flush=True)
                del running[name]


def collect(names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    runs = {}
    for name in names:
        folder = Path(args.out) / name
        log = folder / "encore" / "log.jsonl"
        if not log.is_file():
            continue
        records = read_jsonl(log)
        unedited = json.loads((folder / "unedited.json").read_text())
        batches = [r for r in records if r["kind"] == "batch"]
        evals = [{"num_edits": r["num_edits"], "perplexity": r.get("perplexity"),
                  "retained": r.get("retained_knowledge"),
                  **{k: (r.get("edit_metrics") or {}).get(k) for k in ("ES", "PS", "NS", "S")},
                  "max_norm_ratio": max((n["norm_ratio"] for n in (r.get("norms") or {}).values()), default=None)}
                 for r in records if r["kind"] == "eval"]
        final = next((r for r in reversed(records) if r["kind"] == "final"), None)
        settings, options = parse_combination(name)
        runs[name] = {
            "settings": settings, "options": options,
            "command": " ".join(["python", *command(name, args)[1:]]),  # the lifelong run, as this script starts it
            "unedited": {"perplexity": unedited["perplexity"], "retained": unedited["retained_knowledge"]},
            "evaluations": evals,
            # ES / PS / NS over every edited fact at the end (the evaluations' are over a sample of them)
            "final": {"num_edits": final["num_edits"], **{k: final["edit_metrics"][k] for k in ("ES", "PS", "NS", "S")}}
            if final else None,
            "seconds_per_edit": (sum(b["seconds"]["total"] for b in batches) / batches[-1]["num_edits"]
                                 if batches else None),
            "z_steps_per_edit": sum(b["z_steps"] for b in batches) / batches[-1]["num_edits"] if batches else None,
        }
    return runs


def read_earlier(path: Path) -> dict[str, Any]:
    """What an earlier call wrote into ``--json`` (nothing yet: an empty dict), read once for the two below."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def kept_runs(earlier: dict[str, Any], collected: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The runs already in ``--json`` (``earlier``, its contents) that this call did not collect, so that a
    configuration run later (or on another machine, with the earlier runs' folders gone) joins the earlier ones
    instead of replacing them. Only runs of the same protocol are kept: a file for another model, number of edits
    or batch size is an error."""
    if not earlier:
        return {}
    protocol = {"model": args.model, "dtype": args.dtype, "edits": args.edits, "batch_size": args.batch_size,
                "eval_every": args.eval_every}
    recorded = {"dtype": "float32", **earlier}  # files written before runs had a dtype were all float32
    differing = {k: (recorded.get(k), v) for k, v in protocol.items() if recorded.get(k) != v}
    if differing:
        raise SystemExit(f"{args.json} holds runs of another protocol ({differing}, as (file, now)): "
                         "write these runs to another --json")
    return {name: run for name, run in earlier.get("runs", {}).items() if name not in collected}


def kept_commands(earlier: dict[str, Any], this: str) -> list[str]:
    """Every command that wrote into ``--json`` (``earlier``, its contents), oldest first, ending with ``this``:
    its runs were made by several calls (one per configuration or two), and the file should say how each of them
    was started."""
    commands = earlier.get("commands") or ([earlier["command"]] if "command" in earlier else [])
    return [c for c in commands if c != this] + [this]


def table(runs: dict[str, Any]) -> str:
    lines = ["| configuration | edits | perplexity (unedited) | retained | ES | PS | NS | S | max ‖W‖/‖W₀‖ | s/edit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    # ES / PS / NS: of every edited fact where the run has finished, else of the last evaluation's sample.
    fmt = lambda v, f="{:.3f}": f.format(v) if isinstance(v, (int, float)) else "–"  # noqa: E731
    for name, run in runs.items():
        last = run["evaluations"][-1] if run["evaluations"] else None
        if not last:
            continue
        if run["final"] and run["final"]["num_edits"] == last["num_edits"]:
            last = {**last, **run["final"]}
        lines.append(f"| {name} | {last['num_edits']} | {fmt(last['perplexity'], '{:.2f}')} "
                     f"({fmt(run['unedited']['perplexity'], '{:.2f}')}) | {fmt(last['retained'])} | {fmt(last['ES'])} "
                     f"| {fmt(last['PS'])} | {fmt(last['NS'])} | {fmt(last['S'])} | {fmt(last['max_norm_ratio'])} "
                     f"| {fmt(run['seconds_per_edit'], '{:.2f}')} |")
    return "\n".join(lines)


def plots(runs: dict[str, Any], folder: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = plt.get_cmap("tab20").colors  # more configurations than the default cycle's ten colours
    for i, (name, run) in enumerate(runs.items()):
        points = [(e["num_edits"], e["perplexity"], e["retained"]) for e in run["evaluations"]]
        if not points:
            continue
        edits, ppl, kept = zip(*points)
        style = dict(marker="o", label=name, linewidth=2.5 if name == "defaults" else 1.2,
                     color=colours[2 * i % 20 + 2 * i // 20 % 2])  # dark shades first, then light ones
        line, = axes[0].plot(edits, ppl, **style)
        axes[1].plot(edits, kept, **style)
        if run["final"] and kept[-1] is not None:  # the trade-off: edit score against facts kept, at the end
            axes[2].scatter(run["final"]["S"], kept[-1], color=line.get_color())
            axes[2].annotate(name, (run["final"]["S"], kept[-1]), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
    axes[0].set_title(f"{model}: perplexity (WikiText-2 test)")
    axes[1].set_title(f"{model}: retained known facts")
    axes[2].set_title("at the end: retained against edit score S")
    for ax in axes[:2]:
        ax.set_xlabel("sequential ENCORE edits (counterfact-train)")
    axes[2].set_xlabel("S over every edited fact")
    axes[2].set_ylabel("retained known facts")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"degradation-ablation-{Path(model).name}.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGURATIONS),
                        help="configuration names, or a+b for two together")
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the dtype the base is loaded in (bfloat16: about twice as fast on a CPU with native "
                             "bf16)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per run (with --jobs 1 on a small machine: every core for the one run)")
    parser.add_argument("--perplexity-tokens", type=int, default=10_000,
                        help="held-out tokens perplexity is measured on (the lifelong runs use 20,000)")
    parser.add_argument("--known-facts", type=int, default=200, help="probe facts for retained knowledge")
    parser.add_argument("--edited-sample", type=int, default=100,
                        help="edited facts ES/PS/NS are measured on at each evaluation (all of them at the end)")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--json", default=None, help="collect every run's figures here")
    parser.add_argument("--plots", default=None, help="folder for the plot")
    parser.add_argument("--collect-only", action="store_true", help="only collect what the runs have measured")
    args = parser.parse_args()
    for name in args.configs:
        command(name, args)  # an unknown name fails before anything runs
    if uses_factual_corpus(args.configs[0]):
        raise SystemExit("the first configuration chooses the probe facts that the factual corpus leaves out: "
                         "put one without factual-c0 first")
    if not args.collect_only:
        run_all(args.configs, args)
    runs = collect(args.configs, args)
    if args.json:
        earlier = read_earlier(Path(args.json))
        runs = kept_runs(earlier, runs, args) | runs
    print(table(runs))
    if args.json:
        write_json(args.json, {"model": args.model, "dtype": args.dtype, "baseline": baseline(args.model),
                               "edits": args.edits,
                               "batch_size": args.batch_size,
                               "eval_every": args.eval_every, "machine": machine(), "runs": runs,
                               "commands": kept_commands(earlier, " ".join(sys.argv))})
    if args.plots:
        plots(runs, Path(args.plots), args.model)


if __name__ == "__main__":
    main()
