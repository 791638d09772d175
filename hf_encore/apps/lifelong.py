"""The lifelong-editing benchmark: sequential batches of edits, with the model's degradation measured as it goes.

    python -m hf_encore.apps.lifelong --model smollm2-135m --methods memit alphaedit encore --edits 1000 \\
        --batch-size 100 --eval-every 250 --out runs/smollm2

For each method, ``<out>/<method>/`` holds the adapter (saved after every batch, so a stopped run continues where it
stopped: run the same command again) and ``log.jsonl``: one ``batch`` record per batch (time, steps, ‖ΔW‖) and one
``eval`` record per evaluation point (downstream F1, perplexity, retained knowledge, norms, edit metrics of the facts
edited so far); an evaluation stopped midway continues from the measures it finished (``eval-<n>.partial.json``).
A ``final`` record closes each method: edit metrics of every edited fact, and fluency (GE) of text sampled from
the first edited facts' prompts. ``<out>/unedited.json`` holds the unedited model's figures (GE from the same
prompts); ``<out>/summary.md`` and the PNG plots are rebuilt from the logs at the end.

Edits come from ``--data`` (CounterFact, EasyEdit schema); the retained-knowledge probe comes from ``--probe-data``
(by default counterfact-train, disjoint from the default edits). No probe fact is ever edited, also when both are
one file (an ablation on counterfact-train: ``benchmarks/degradation_ablation.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..jsonl import append_jsonl, read_jsonl, write_jsonl  # standard library only: no import cost

logger = logging.getLogger(__name__)

GENERATED = "generated"  # --corpus value: C₀ from model-generated text, as get_encore_model does without a corpus


@dataclass
class EvalSettings:
    """How much of each measure to run at every evaluation point."""

    downstream_tasks: tuple[str, ...] = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
    downstream_items: int = 100
    downstream_shots: int = 4
    perplexity_tokens: int = 20_000
    known_facts: int = 200
    edited_sample: int = 500  # edit metrics on a fixed random sample of the facts edited so far
    fluency_sample: int = 100  # at the end: fluency (GE) of text generated from this many edited facts' prompts


@dataclass
class LifelongSettings:
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("memit", "alphaedit", "encore")
    data: str | None = None  # CounterFact file of edits (default: counterfact-edit.json)
    probe_data: str | None = None  # disjoint CounterFact file for retained knowledge (default: counterfact-train)
    corpus: str | None = None  # statistics corpus (default: wikitext-2-valid; GENERATED: text the model generates);
    # perplexity uses wikitext-2-test
    perplexity_text: str | None = None
    downstream_dir: str | None = None
    edits: int = 1000
    batch_size: int = 100
    eval_every: int = 250
    seed: int = 0
    out: str = "runs/lifelong"
    device: str | None = None  # e.g. "cuda"; default: where transformers loads the model (the CPU)
    precision: str = "float32"  # the dtype the base is loaded in (a resumed run must keep it: the adapter records it)
    config: dict[str, Any] = field(default_factory=dict)  # EncoreConfig settings for every method
    evaluation: EvalSettings = field(default_factory=EvalSettings)


def method_config(name: str, extra: dict[str, Any]):
    """``"encore"``, ``"memit"``, ``"alphaedit"``, optionally with ``+mpes`` (e.g. ``"alphaedit+mpes"``)."""
    from ..config import EncoreConfig

    base, *switches = name.split("+")
    unknown = [s for s in switches if s != "mpes"]
    if unknown:
        raise ValueError(f"Unknown switch(es) {unknown} in method {name!r}; only '+mpes' is known")
    return EncoreConfig(method=base, **({"mpes": True} if switches else {}), **extra)


def is_eval_point(done: int, settings: LifelongSettings) -> bool:
    """Evaluate before any edit, after the last, and after each batch that reaches a multiple of ``eval_every``
    (batches are never split: with batches of 100 and every 250, that is after 300, 500, 800, 1000 edits)."""
    every = settings.eval_every
    return done == 0 or done >= settings.edits or done // every > max(0, done - settings.batch_size) // every


def _paths(settings: LifelongSettings):
    from ..data import data_dir

    root = data_dir()
    return (Path(settings.data or root / "counterfact" / "counterfact-edit.json"),
            Path(settings.probe_data or root / "counterfact" / "counterfact-train.json"),
            None if settings.corpus == GENERATED else Path(settings.corpus or root / "corpus" / "wikitext-2-valid.txt"),
            Path(settings.perplexity_text or root / "corpus" / "wikitext-2-test.txt"),
            Path(settings.downstream_dir or root / "downstream"))


def choose_edits(cases: Sequence[dict], probe: Sequence[dict], count: int, seed: int, source: object = "the data"
                 ) -> list[dict]:
    """``count`` cases drawn (seeded) from ``cases``, never one of the ``probe`` facts.

    Edits and probe may come from one file (an ablation on counterfact-train); with disjoint files (the reported
    runs) nothing is removed, so the draw is the same as drawing from ``cases`` alone.
    """
    probed = {c["case_id"] for c in probe}
    allowed = [c for c in cases if c["case_id"] not in probed]
    if count > len(allowed):
        raise ValueError(f"{source} has {len(allowed)} cases that are not probe facts; {count} edits asked for")
    return [allowed[i] for i in random.Random(seed).sample(range(len(allowed)), count)]


def perplexity_texts(path: Path) -> list[str]:
    """The held-out text perplexity is measured on: the file's non-empty lines as they are, without WikiText
    headings. (Not ``read_corpus``, which strips lines: the published perplexities were measured on these.)"""
    return [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip() and not t.strip().startswith("=")]


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (none before the first is written)."""
    return read_jsonl(path) if path.is_file() else []


def evaluate_point(model, tokenizer, *, edited: Sequence[dict], probe: Sequence[dict], texts: Sequence[str],
                   downstream_dir: Path, ev: EvalSettings, adapter: bool,
                   checkpoint: Path | None = None) -> dict[str, Any]:
    """Every degradation measure, and the edit metrics of ``edited``, on the model as it is now.

    With ``checkpoint``, each measure (each downstream task on its own) is written there as soon as it is done, and
    a call that finds the file reuses what it holds: on a 0.5B model on a CPU one evaluation takes long enough for
    a session to end in its middle. The file must describe this same model state; the caller keys it (see
    :func:`run`). ``eval_seconds`` is the sum of the measures' own times, whichever call ran them.
    """
    from ..evaluation import (
        counterfact_scores,
        evaluate_task,
        load_task,
        perplexity,
        retained_knowledge,
        task_means,
        weight_norms,
    )
    from ..evaluation.downstream import TASKS

    settings = json.loads(json.dumps(asdict(ev)))  # as the file holds them (lists, not tuples)
    saved = json.loads(checkpoint.read_text()) if checkpoint and checkpoint.is_file() else {}
    # Measures taken with other evaluation settings are not this evaluation's.
    parts: dict[str, Any] = saved["parts"] if saved.get("evaluation") == settings else {}

    def measure(name: str, compute) -> Any:
        if name not in parts:
            start = time.perf_counter()
            parts[name] = {"value": compute(), "seconds": time.perf_counter() - start}
            if checkpoint:
                checkpoint.write_text(json.dumps({"evaluation": settings, "parts": parts}))
        return parts[name]["value"]

    record: dict[str, Any] = {}
    if ev.downstream_tasks:
        record["downstream"] = task_means({
            name: measure(f"downstream/{name}", lambda name=name: evaluate_task(
                model, tokenizer, TASKS[name], load_task(name, downstream_dir), n_shots=ev.downstream_shots,
                n_test=ev.downstream_items))
            for name in ev.downstream_tasks})
    record["perplexity"] = measure("perplexity", lambda: perplexity(model, tokenizer, texts,
                                                                    n_tokens=ev.perplexity_tokens))
    record["retained_knowledge"] = measure("retained_knowledge", lambda: retained_knowledge(model, tokenizer, probe)
                                           if probe else None)
    if edited:
        def edit_metrics():
            scores = counterfact_scores(model, tokenizer, edited)
            return {**{k: v for k, v in scores.items() if k != "per_case"}, "n": len(edited)}
        record["edit_metrics"] = measure("edit_metrics", edit_metrics)
    if adapter:
        record["norms"] = {str(k): v for k, v in weight_norms(model).items()}
    record["eval_part_seconds"] = {name: part["seconds"] for name, part in parts.items()}
    record["eval_seconds"] = sum(record["eval_part_seconds"].values())
    return record


def run(settings: LifelongSettings, progress: bool = True) -> Path:
    """Run (or continue) the benchmark; returns the output directory."""
    import torch

    from .. import from_pretrained, get_encore_model
    from ..data import load_counterfact
    from ..evaluation import counterfact_scores, generated_fluency, known_facts, weight_norms
    from ..loading import load_model

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    edits_path, probe_path, corpus, ppl_path, downstream_dir = _paths(settings)
    (out / "settings.json").write_text(json.dumps(asdict(settings), indent=1, default=str))
    texts = perplexity_texts(ppl_path)
    ev = settings.evaluation
    dtype = getattr(torch, settings.precision)
    base, tokenizer = load_model(settings.model, device=settings.device, dtype=dtype)
    probe_file = out / "probe_facts.json"
    if probe_file.is_file():
        probe = json.loads(probe_file.read_text())
    else:
        probe = known_facts(base, tokenizer, load_counterfact(probe_path), ev.known_facts)
        probe_file.write_text(json.dumps(probe))
    chosen = choose_edits(load_counterfact(edits_path), probe, settings.edits, settings.seed, edits_path)
    # One fixed order of the edits, the same for every method: the facts edited so far, in this order, give the
    # evaluation sample (a prefix of it), and its first cases the fluency prompts.
    order = random.Random(settings.seed + 1).sample(range(settings.edits), settings.edits)
    fluency_prompts = [chosen[i]["prompt"].replace("{}", chosen[i]["subject"]) for i in order[: ev.fluency_sample]]

    unedited_file = out / "unedited.json"
    if not unedited_file.is_file():
        logger.info("Evaluating the unedited model")
        partial = out / "unedited.partial.json"
        record = evaluate_point(base, tokenizer, edited=[], probe=probe, texts=texts, downstream_dir=downstream_dir,
                                ev=ev, adapter=False, checkpoint=partial)
        unedited_file.write_text(json.dumps({"num_edits": 0, **record}, indent=1))
        partial.unlink()
    unedited = json.loads(unedited_file.read_text())
    # Also for runs begun before fluency was measured, and for a run extended to more edits (other prompts).
    if fluency_prompts and unedited.get("fluency_prompts") != fluency_prompts:
        unedited.update(fluency=generated_fluency(base, tokenizer, fluency_prompts), fluency_prompts=fluency_prompts)
        unedited_file.write_text(json.dumps(unedited, indent=1))
    del base

    for method in settings.methods:
        method_dir = out / method.replace("+", "_")
        method_dir.mkdir(exist_ok=True)
        log_path = method_dir / "log.jsonl"
        adapter_dir = method_dir / "adapter"
        base, tokenizer = load_model(settings.model, device=settings.device, dtype=dtype)
        if (adapter_dir / "encore_state.json").is_file():
            model = from_pretrained(base, adapter_dir, tokenizer=tokenizer, corpus=corpus)
            done = model.base_model.edit_states["default"].num_edits
            logger.info("%s: continuing after %d edits", method, done)
        else:
            model = get_encore_model(base, method_config(method, settings.config), tokenizer=tokenizer,
                                     corpus=corpus)
            done = 0
        # Records past the last saved adapter belong to work that was lost: drop them.
        log = [r for r in _read_log(log_path) if r["num_edits"] <= done]
        write_jsonl(log_path, log)

        def checkpoint(n_done: int, method_dir: Path = method_dir) -> Path:
            # Keyed by the number of edits: the adapter saved after that many edits is the model it measures.
            return method_dir / f"eval-{n_done}.partial.json"

        for stale in method_dir.glob("eval-*.partial.json"):  # of other model states (e.g. a run begun afresh)
            if stale != checkpoint(done):
                stale.unlink()

        def edited_sample(n_done: int) -> list[dict]:
            return [chosen[i] for i in order if i < n_done][: ev.edited_sample]

        started = time.perf_counter() - max((r.get("elapsed_seconds", 0.0) for r in log), default=0.0)
        while True:
            if is_eval_point(done, settings):
                if not any(r["kind"] == "eval" and r["num_edits"] == done for r in log):
                    if done == 0:
                        # An adapter without edits is the base model: its figures are the unedited ones.
                        start = time.perf_counter()
                        measures = ("downstream", "perplexity", "retained_knowledge")
                        record = {**{k: v for k, v in json.loads(unedited_file.read_text()).items() if k in measures},
                                  "norms": {str(k): v for k, v in weight_norms(model).items()}}
                        record["eval_seconds"] = time.perf_counter() - start
                    else:
                        record = evaluate_point(model, tokenizer, edited=edited_sample(done), probe=probe,
                                                texts=texts, downstream_dir=downstream_dir, ev=ev, adapter=True,
                                                checkpoint=checkpoint(done))
                    record = {"kind": "eval", "method": method, "num_edits": done,
                              "elapsed_seconds": time.perf_counter() - started, **record}
                    append_jsonl(log_path, record)
                    log.append(record)
                    checkpoint(done).unlink(missing_ok=True)
                    logger.info("%s after %d edits: %s", method, done, {k: record[k] for k in record
                                                                       if k in ("perplexity", "retained_knowledge")})
            if done >= settings.edits:
                break
            batch = chosen[done: done + settings.batch_size]
            report = model.edit([{k: c[k] for k in ("prompt", "subject", "target_new")} for c in batch],
                                progress=progress)
            done += len(batch)
            model.save_pretrained(adapter_dir)
            record = {"kind": "batch", "method": method, "num_edits": done,
                      "elapsed_seconds": time.perf_counter() - started, "seconds": report.seconds,
                      "z_steps": sum(r.steps for r in report.requests),
                      "mpes_stopped": sum(r.mpes_stopped for r in report.requests),
                      "layers": [asdict(layer) for layer in report.layers]}
            append_jsonl(log_path, record)
            log.append(record)
        final = next((r for r in log if r["kind"] == "final" and r["num_edits"] == done), None)
        if final is None:
            scores = counterfact_scores(model, tokenizer, chosen)
            final = {"kind": "final", "method": method, "num_edits": done,
                     "edit_metrics": {k: v for k, v in scores.items() if k != "per_case"}}
            if fluency_prompts:
                final["fluency"] = generated_fluency(model, tokenizer, fluency_prompts)
            append_jsonl(log_path, final)
        elif fluency_prompts and "fluency" not in final:  # a run that finished before fluency was measured
            final["fluency"] = generated_fluency(model, tokenizer, fluency_prompts)
            write_jsonl(log_path, log)
        del model, base
    write_summary(out, settings.methods)
    return out


def write_summary(out: Path, methods: Sequence[str]) -> None:
    """``summary.md`` and the plots, from the logs."""
    unedited = json.loads((out / "unedited.json").read_text())
    logs = {m: _read_log(out / m.replace("+", "_") / "log.jsonl") for m in methods}
    lines = ["| method | edits | downstream F1 | F1 (likelihood) | perplexity | retained | ES | PS | NS | S | "
             "GE | max ‖W‖/‖W₀‖ | s/edit |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, record, seconds_per_edit=None):
        ds = record.get("downstream") or {}
        em = record.get("edit_metrics") or {}
        norms = record.get("norms") or {}
        fmt = lambda v, f="{:.3f}": f.format(v) if isinstance(v, (int, float)) else "–"  # noqa: E731
        return (f"| {name} | {record['num_edits']} | {fmt(ds.get('mean_f1'))} | {fmt(ds.get('mean_f1_likelihood'))} "
                f"| {fmt(record.get('perplexity'), '{:.2f}')} | {fmt(record.get('retained_knowledge'))} "
                f"| {fmt(em.get('ES'))} | {fmt(em.get('PS'))} | {fmt(em.get('NS'))} | {fmt(em.get('S'))} "
                f"| {fmt(record.get('fluency'), '{:.3f}')} "
                f"| {fmt(max((n['norm_ratio'] for n in norms.values()), default=None))} "
                f"| {fmt(seconds_per_edit, '{:.2f}')} |")

    lines.append(row("unedited", unedited))
    for method, log in logs.items():
        evals = [r for r in log if r["kind"] == "eval"]
        batches = [r for r in log if r["kind"] == "batch"]
        per_edit = sum(b["seconds"]["total"] for b in batches) / max(1, batches[-1]["num_edits"]) if batches else None
        for record in evals:
            lines.append(row(method, record, per_edit if record is evals[-1] else None))
        final = [r for r in log if r["kind"] == "final" and r["num_edits"] == (evals[-1]["num_edits"] if evals else -1)]
        if final:
            lines.append(row(f"{method} (all edited facts)", final[-1]))
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(out, unedited, logs)


def plot(out: Path, unedited: dict, logs: dict[str, list[dict]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'hf_encore[bench]')")
        return
    def max_norm_ratio(r):
        # Every batch record carries the norms, so the curve has one point per batch, not per evaluation.
        if r["kind"] == "batch":
            return max((layer["weight_norm_ratio"] for layer in r.get("layers") or []), default=None)
        return 1.0 if r["kind"] == "eval" and r["num_edits"] == 0 else None

    # (file, title, value of a log record, records read, unedited level drawn, log scale)
    panels = [
        ("downstream.png", "mean downstream F1", lambda r: (r.get("downstream") or {}).get("mean_f1"), "eval",
         True, False),
        ("perplexity.png", "perplexity (held-out WikiText-2)", lambda r: r.get("perplexity"), "eval", True, True),
        ("retained.png", "retained knowledge", lambda r: r.get("retained_knowledge"), "eval", True, False),
        ("norms.png", "max ‖W‖/‖W₀‖ over edited layers", max_norm_ratio, "all", False, True),
    ]
    for filename, title, value, kinds, has_baseline, log_scale in panels:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, log in logs.items():
            points = [(r["num_edits"], value(r)) for r in log
                      if (kinds == "all" or r["kind"] == kinds) and value(r) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=method)
        if has_baseline and value(unedited) is not None:
            ax.axhline(value(unedited), color="grey", linestyle="--", label="unedited")
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("number of edits")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    for ax, metric in zip(axes, ("ES", "PS", "NS")):
        for method, log in logs.items():
            points = [(r["num_edits"], r["edit_metrics"][metric]) for r in log
                      if r["kind"] == "eval" and r.get("edit_metrics")]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_title(f"{metric} of the facts edited so far")
        ax.set_xlabel("number of edits")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "edit_metrics.png", dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[LifelongSettings, bool]:
    from .options import UsageError, add_precision_argument, parse_settings

    parser = argparse.ArgumentParser(prog="hf-encore bench", description=__doc__.split("\n\n")[0])
    d = LifelongSettings()
    e = EvalSettings()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--methods", nargs="+", default=list(d.methods))
    parser.add_argument("--data", default=None)
    parser.add_argument("--probe-data", default=None)
    parser.add_argument("--corpus", default=None,
                        help=f"statistics text (default: WikiText-2 valid); {GENERATED!r}: text the model generates")
    parser.add_argument("--edits", type=int, default=d.edits)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=d.out)
    parser.add_argument("--device", default=d.device, help="e.g. cuda (default: the CPU)")
    add_precision_argument(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an EncoreConfig setting for every method, as JSON (e.g. --set norm_weight=0.1)")
    parser.add_argument("--tasks", nargs="*", default=list(e.downstream_tasks))
    parser.add_argument("--downstream-items", type=int, default=e.downstream_items)
    parser.add_argument("--perplexity-tokens", type=int, default=e.perplexity_tokens)
    parser.add_argument("--known-facts", type=int, default=e.known_facts)
    parser.add_argument("--edited-sample", type=int, default=e.edited_sample)
    parser.add_argument("--fluency-sample", type=int, default=e.fluency_sample,
                        help="edited facts whose prompts measure fluency at the end (0: none)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = parse_settings(args.set)
    except UsageError as err:
        parser.error(str(err))
    if args.eval_every < 1 or args.batch_size < 1 or args.edits < 1:
        parser.error("--edits, --batch-size and --eval-every must be positive")
    settings = LifelongSettings(
        model=args.model, methods=tuple(args.methods), data=args.data, probe_data=args.probe_data,
        corpus=args.corpus, edits=args.edits, batch_size=args.batch_size, eval_every=args.eval_every,
        seed=args.seed, out=args.out, device=args.device, precision=args.precision, config=config,
        evaluation=EvalSettings(tuple(args.tasks), args.downstream_items, e.downstream_shots, args.perplexity_tokens,
                                args.known_facts, args.edited_sample, args.fluency_sample))
    for method in settings.methods:
        try:
            method_config(method, config)  # fail on a bad method or setting before anything runs
        except ValueError as err:
            parser.error(str(err))
    return settings, not args.no_progress


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings, progress = parse_args(argv)
    out = run(settings, progress)
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
