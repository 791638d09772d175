"""``hf-encore``: edit, inspect, evaluate, merge and share knowledge edits from the shell.

    hf-encore edit requests.json --out edits/            # write facts into a new adapter (or --adapter to continue)
    hf-encore ask "LeBron James plays the sport of" --adapter edits/ --target " football"
    hf-encore eval --adapter edits/ --counterfact edits.json --downstream
    hf-encore show edits/
    hf-encore merge --adapter edits/ --out merged/
    hf-encore push edits/ me/my-edits
    hf-encore stats --model smollm2-135m
    hf-encore bench --methods memit encore --edits 200      # the lifelong benchmark (python -m hf_encore.apps.lifelong)

User errors (missing file, bad request, wrong base model, unknown method) print one line and exit with status 2;
``--verbose`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .options import (
    UsageError,
    add_precision_argument,
    non_negative_int,
    parse_settings,
    positive_int,
    positive_seconds,
)

EXIT_USER_ERROR = 2


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client errors of the installed huggingface_hub (httpx2 in 2.x, httpx before)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..loading import ModelFetchError
    from ..model import EditStateMissingError

    # ValueError covers bad requests and settings, AdapterFileError and BaseModelMismatchError; OSError covers
    # missing files, model ids transformers cannot resolve, huggingface_hub's HTTP errors and an unreachable Hub
    # (hub.HubConnectionError); the client's HTTPError is any other transport failure of huggingface_hub.
    return (UsageError, ValueError, OSError, EditStateMissingError, ModelFetchError, *_transport_errors())


# --- model loading ---------------------------------------------------------------------------------------------


def _corpus(args) -> Any:
    """--corpus, or --corpus-dataset (streamed), else the shared WikiText-2 if it is there (else ``None``:
    model-generated text, with a warning)."""
    from ..data import data_dir
    from ..editing.corpus import DatasetCorpus

    if getattr(args, "corpus_dataset", None):
        if getattr(args, "corpus", None):
            raise UsageError("give --corpus or --corpus-dataset, not both")
        name, config, split = (args.corpus_dataset.split(":") + [None, None])[:3]
        return DatasetCorpus(name, config or None, split or "train")
    if getattr(args, "corpus", None):
        if not Path(args.corpus).exists():
            raise UsageError(f"corpus not found: {args.corpus}")
        return args.corpus
    default = data_dir() / "corpus" / "wikitext-2-valid.txt"
    return default if default.is_file() else None


def _load(args, *, adapter: str | None = None, corpus: str | Path | None = None):
    """(model, tokenizer): the base model, with the adapter attached if one is given (``corpus``: its statistics
    text, needed only to edit further)."""
    import torch

    from .. import from_pretrained
    from ..loading import load_model
    from ..peft_model import read_config, recorded_base, resolve_adapter_dir

    name, gguf_file = args.model, args.gguf_file
    if adapter is not None and name is None:
        directory = resolve_adapter_dir(adapter)
        try:
            recorded = recorded_base(read_config(directory, args.ignore_base_mismatch), directory)
        except ValueError as err:
            raise UsageError(f"{err}: pass --model") from None
        name, gguf_file = recorded["name_or_path"], recorded.get("gguf_file")
    placement = {"device_map": args.device_map, "offload_folder": args.offload_folder} if args.device_map else {}
    base, tokenizer = load_model(name or "smollm2-135m", gguf_file=gguf_file, device=args.device,
                                 dtype=getattr(torch, args.precision), **placement)
    if adapter is None:
        return base, tokenizer
    model = from_pretrained(base, adapter, tokenizer=tokenizer, corpus=corpus,
                            ignore_base_mismatch=args.ignore_base_mismatch)
    return model, tokenizer


def _add_model_args(parser: argparse.ArgumentParser, adapter_flag: bool = True) -> None:
    parser.add_argument("--model", default=None,
                        help="built-in name (smollm2-135m, gemma-3-270m, qwen2.5-0.5b, qwen2.5-1.5b), a directory, a "
                             ".gguf file or a Hub id; default: the adapter's recorded base, else smollm2-135m")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model (a directory or Hub id)")
    parser.add_argument("--device", default=None, help="where to run, e.g. cuda (default: the CPU)")
    add_precision_argument(parser)
    parser.add_argument("--device-map", default=None,
                        help="dispatch the model with accelerate instead of --device: auto, balanced, sequential")
    parser.add_argument("--offload-folder", default=None, help="where --device-map may offload weights to disk")
    if adapter_flag:
        parser.add_argument("--adapter", default=None, help="adapter directory or Hub id")
    parser.add_argument("--ignore-base-mismatch", action="store_true",
                        help="load an adapter onto weights other than those it was made for")


# --- subcommands -----------------------------------------------------------------------------------------------


def cmd_edit(args) -> int:
    from .. import EncoreConfig, get_encore_model
    from ..data import load_requests
    from ..save_transaction import check_save_target

    requests = load_requests(args.requests, limit=args.limit)
    overrides = parse_settings(args.set)
    if args.method:
        overrides["method"] = args.method
    if args.prompt_format:
        overrides["prompt_format"] = args.prompt_format
    # The settings that shape an adapter (which layers, where) are given when it is created, not per batch.
    creation = {key: overrides.pop(key) for key in ("layers", "block_path", "mlp_out") if key in overrides}
    if args.layers:
        if creation.get("layers", args.layers) != args.layers:
            raise UsageError("give the layers once: --layers or --set layers=[...]")
        creation["layers"] = args.layers
    EncoreConfig(**creation).with_overrides(**overrides)  # names a bad setting before any model is loaded
    if not (args.out or (args.adapter and Path(args.adapter).is_dir())):
        raise UsageError("--out is required (the adapter directory to write)")
    out = Path(args.out or args.adapter)
    # An adapter already at --out is continued, never overwritten by a new one.
    adapter = args.adapter or (str(out) if (out / "adapter_config.json").is_file() else None)
    if adapter is None or Path(adapter) != out:
        check_save_target(out)  # a folder that is not an adapter is refused before any model is loaded
    corpus = _corpus(args)
    if adapter:
        if creation:
            given = ", ".join("--layers" if key == "layers" and args.layers else f"--set {key}" for key in creation)
            raise UsageError(f"{given}: only for a new adapter; {adapter} edits {_layers_of(adapter)}")
        if not args.quiet:
            print(f"continuing the adapter in {adapter}", file=sys.stderr)
        model, tokenizer = _load(args, adapter=adapter, corpus=corpus)
    else:
        config = EncoreConfig(method=overrides.pop("method", "encore"), **creation)
        config = config.with_overrides(**overrides)
        overrides = {}
        base, tokenizer = _load(args)
        model = get_encore_model(base, config, tokenizer=tokenizer, corpus=corpus)
    rows = []
    total = len(requests)
    for start in range(0, total, args.batch_size):
        batch = requests[start: start + args.batch_size]
        report = model.edit(batch, progress=not args.quiet, **overrides)
        model.save_pretrained(out, delta_dtype=args.delta_dtype)  # after every batch: a stop loses one batch
        rows.append(_batch_row(len(rows) + 1, report))
        if not args.quiet:
            print(f"batch {len(rows)}: {len(batch)} edits in {report.seconds['total']:.1f} s, saved to {out}",
                  file=sys.stderr)
    state = model.base_model.edit_states["default"]
    print(_table(["batch", "edits", "seconds", "z steps", "MPES stops", "p before", "p after", "raised",
                  "max ‖W‖/‖W₀‖"], rows))
    print(f"\n{total} edits written ({state.num_edits} in the adapter, {state.num_batches} batches) → {out}")
    return 0


def _layers_of(adapter: str) -> Any:
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("layers")
    except (OSError, ValueError):
        return "its recorded layers"


def _batch_row(number: int, report) -> list[Any]:
    n = len(report.requests)
    return [number, n, f"{report.seconds.get('total', 0):.1f}", sum(r.steps for r in report.requests),
            sum(r.mpes_stopped for r in report.requests),
            f"{sum(r.p_target_before for r in report.requests) / n:.3f}",
            f"{sum(r.p_target_after for r in report.requests) / n:.3f}",
            f"{report.success_rate:.0%}",
            f"{max(layer.weight_norm_ratio for layer in report.layers):.4f}"]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_ask(args) -> int:
    import torch

    from ..editing.prompt_format import prompt_format
    from ..evaluation import continuation_nll

    model, tokenizer = _load(args, adapter=args.adapter)
    form = prompt_format(tokenizer, args.prompt_format)
    if args.target and len(args.target) not in (1, len(args.prompts)):
        raise UsageError(f"give one --target, or one per prompt ({len(args.prompts)}), not {len(args.target)}")
    targets = (args.target * len(args.prompts) if len(args.target or []) == 1 else args.target) or []

    @torch.no_grad()
    def answers(m) -> tuple[list[str], list[float]]:
        texts = []
        for prompt in args.prompts:
            ids = tokenizer(form.wrap(prompt), return_tensors="pt", add_special_tokens=form.add_special_tokens)
            out = m.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        probs = (-continuation_nll(m, tokenizer, args.prompts, targets, form=form)).exp().tolist() if targets else []
        return texts, probs

    after = answers(model)
    before = None
    if args.adapter:
        with model.disable_adapter():
            before = answers(model)
    for i, prompt in enumerate(args.prompts):
        print(prompt)
        for label, got in (("base", before), ("edited" if before else "model", after)):
            if got is None:
                continue
            line = f"  {label:>6}: {got[0][i]!r}"
            if targets:
                line += f"   p({targets[i]!r}) = {got[1][i]:.4f}"
            print(line)
    return 0


def cmd_eval(args) -> int:
    from ..data import data_dir, load_counterfact
    from ..editing.prompt_format import prompt_format
    from ..evaluation import TASKS, counterfact_scores, downstream_scores, load_zsre, weight_norms, zsre_scores

    if not (args.counterfact or args.zsre or args.downstream):
        raise UsageError("choose at least one of --counterfact, --zsre, --downstream")
    # The data are read and the task names checked before the model is loaded: a typo fails in a second.
    cases = records = directory = None
    if args.counterfact:
        cases = load_counterfact(None if args.counterfact == "default" else args.counterfact, limit=args.limit)
    if args.zsre:
        records = load_zsre(data_dir() / "zsre" / "zsre_mend_train-1k.json" if args.zsre == "default" else args.zsre,
                            limit=args.limit)
    if args.downstream:
        directory = Path(data_dir() / "downstream" if args.downstream == "default" else args.downstream)
        if not directory.is_dir():
            raise UsageError(f"downstream task directory not found: {directory}")
        unknown = [t for t in args.tasks or [] if t not in TASKS]
        if unknown:
            raise UsageError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(sorted(TASKS))}")
        if args.tasks == []:
            raise UsageError(f"--tasks needs at least one task name; known: {', '.join(sorted(TASKS))}")
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise UsageError(f"--json {args.json}: its directory does not exist")
    model, tokenizer = _load(args, adapter=args.adapter)
    form = prompt_format(tokenizer, args.prompt_format)
    results: dict[str, Any] = {}
    if cases is not None:
        scores = counterfact_scores(model, tokenizer, cases, fluency=args.fluency, form=form)
        results["counterfact"] = {k: v for k, v in scores.items() if k != "per_case"}
    if records is not None:
        scores = zsre_scores(model, tokenizer, records, form=form)
        results["zsre"] = {k: v for k, v in scores.items() if k != "per_case"}
    if directory is not None:
        tasks = {"tasks": args.tasks} if args.tasks else {}
        scores = downstream_scores(model, tokenizer, directory, n_test=args.items, **tasks)
        results["downstream"] = scores
    if args.adapter:
        results["norms"] = weight_norms(model)
    text = json.dumps(results, indent=1, default=float)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


def cmd_stats(args) -> int:
    import os

    import torch
    import torch.distributed as dist

    from .. import EncoreConfig, get_encore_model
    from ..editing.stats import is_main_process

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # Started by `accelerate launch` / `torchrun` (their environment names the group): each process reads its
        # share of the corpus on its own GPU, or the CPU, and the sums are all-reduced (editing/stats.py).
        gpu = torch.cuda.is_available()
        dist.init_process_group("nccl" if gpu else "gloo")
        if gpu and args.device is None:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    main_process = is_main_process()
    base, tokenizer = _load(args)
    overrides = {"stats_n_tokens": args.tokens} if args.tokens else {}
    model = get_encore_model(base, EncoreConfig(layers=args.layers, **overrides), tokenizer=tokenizer)
    corpus = _corpus(args)
    if corpus is None:
        raise UsageError("no --corpus given and the shared WikiText-2 corpus is not there")
    start = time.perf_counter()
    stats = model.base_model.compute_statistics(corpus, progress=not args.quiet and main_process)
    if not main_process:
        return 0
    refs = model.base_model.edit_states["default"].stats_refs
    rows = [[layer, tuple(s.c0.shape), s.n_tokens, refs[layer]["cache_key"]] for layer, s in stats.items()]
    print(_table(["layer", "C₀ shape", "tokens", "cache key"], rows))
    print(f"\nready in {time.perf_counter() - start:.1f} s; cached under {model.base_model.statistics.directory}")
    return 0


def cmd_show(args) -> int:
    from safetensors.torch import load_file

    from ..peft_model import read_config
    from ..serialization import ADAPTER_WEIGHTS, STATE_JSON, read_ledger, verify_adapter_directory

    directory = Path(args.adapter)
    if not directory.is_dir():
        raise UsageError(f"adapter directory not found: {directory}")
    meta = verify_adapter_directory(directory)
    config = read_config(directory, ignore_base_mismatch=True)
    deltas = load_file(str(directory / ADAPTER_WEIGHTS))
    ledger = read_ledger(directory / "encore_ledger.jsonl")
    # read_ledger checks each entry's shape; the report's inner rows are only displayed, so a missing value shows
    # as "?" rather than failing the whole listing.
    last_ratios = {x.get("layer", "?"): x.get("weight_norm_ratio", "?") for x in ledger[-1]["report"]["layers"]
                   if isinstance(x, dict)} if ledger else {}
    info = {
        "directory": str(directory),
        "method": config.method,
        "base_model": config.base_model_name_or_path,
        "gguf_file": config.gguf_file,
        "base_model_fingerprint": config.base_model_fingerprint,
        "layers": config.layers,
        "num_edits": (meta or {}).get("num_edits"),
        "num_batches": (meta or {}).get("num_batches"),
        "editing_state": meta is not None,
        "settings": config.algorithm_settings(),
        "delta_norms": {name: float(t.double().norm()) for name, t in sorted(deltas.items())},
        "weight_norm_ratio_after_last_batch": last_ratios,
    }
    if args.json:
        print(json.dumps({**info, "ledger": ledger}, indent=1))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    if ledger:
        rows = []
        for entry in ledger:
            reqs = entry["report"]["requests"]
            p_after = [r.get("p_target_after") for r in reqs if isinstance(r, dict)]
            p_after = [p for p in p_after if isinstance(p, (int, float)) and not isinstance(p, bool)]
            rows.append([entry["batch"], entry["method"], len(reqs), _utc_minute(entry["time"]),
                         f"{sum(p_after) / len(p_after):.3f}" if p_after else "?"])
        print("\nledger (" + STATE_JSON.replace("state.json", "ledger.jsonl") + "):")
        print(_table(["batch", "method", "edits", "time (UTC)", "mean p after"], rows[-args.last:]))
        for entry in ledger[-1:]:
            for req in entry["requests"][: args.requests]:
                print(f"  {req['prompt'].replace('{}', req['subject'])} → {req['target_new']}")
    return 0


def _utc_minute(timestamp: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))
    except (OverflowError, OSError, ValueError):  # a hand-edited ledger's time outside the platform's range
        return "?"


def check_merge_target(out: Path) -> None:
    """Refuse a --out that is a file or a non-empty directory: save_pretrained would fail after the merge, or
    overwrite and delete files (stale shards) in it."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} is an existing file; give a new directory name")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty directory and writing the merged model there would replace "
                         "or delete files in it; give a new or empty directory (or remove it first)")


def cmd_merge(args) -> int:
    import torch

    out = Path(args.out)
    check_merge_target(out)  # before the (slow) load and merge
    model, tokenizer = _load(args, adapter=args.adapter)
    merged = model.merge_and_unload()
    if args.dtype:
        merged = merged.to(getattr(torch, args.dtype))
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args) -> int:
    model, _ = _load(args, adapter=args.adapter)
    report = model.to_lora(args.lora, rank=args.rank)
    print(_table(["module", "rank", "numerical rank", "relative error", "LoRA params", "dense params"],
                 [[x.module, x.rank, x.numerical_rank, f"{x.relative_error:.2e}", x.lora_parameters,
                   x.dense_parameters] for x in report]))
    print(f"\nLoRA adapter written to {args.lora}")
    return 0


def cmd_push(args) -> int:
    from ..hub import push_to_hub

    model, _ = _load(args, adapter=args.adapter)
    info = push_to_hub(model, args.repo_id, private=args.private or None, token=args.token,
                       include_editing_state=not args.no_editing_state, delta_dtype=args.delta_dtype,
                       endpoint=args.endpoint, timeout=args.timeout)
    print(f"pushed to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0


def cmd_bench(args) -> int:
    from .lifelong import main as lifelong_main

    lifelong_main(args.rest)
    return 0


# --- parser ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ..config import METHODS
    from ..editing.prompt_format import PROMPT_FORMATS

    parser = argparse.ArgumentParser(prog="hf-encore", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("edit", help="write facts from a file into an adapter")
    p.add_argument("requests", help="JSON, JSON lines or CSV of {prompt, subject, target_new}; or CounterFact/zsRE")
    _add_model_args(p)
    p.add_argument("--out", help="adapter directory to write (default: --adapter, updated in place)")
    p.add_argument("--method", choices=METHODS, default=None, help="default: encore (or the adapter's)")
    p.add_argument("--layers", type=non_negative_int, nargs="+", default=None,
                   help="edited layers (new adapters only)")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N requests")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any EncoreConfig setting")
    p.add_argument("--corpus", default=None, help="text file(s) for C₀ (default: ../shared WikiText-2 if present)")
    p.add_argument("--corpus-dataset", default=None, metavar="NAME[:CONFIG[:SPLIT]]",
                   help="a dataset for C₀, streamed as far as the token budget (needs the datasets extra)")
    p.add_argument("--delta-dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None,
                   help="edit through plain prompts or the tokenizer's chat template (default: plain, or the "
                        "adapter's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("ask", help="generate (and score targets) with and without an adapter")
    p.add_argument("prompts", nargs="+")
    _add_model_args(p)
    p.add_argument("--target", action="append", default=None, help="a continuation to score (repeat per prompt)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8)
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="plain",
                   help="ask as plain text, or as the user's message in the tokenizer's chat template")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval", help="CounterFact / zsRE / downstream metrics of a model or adapter")
    _add_model_args(p)
    p.add_argument("--counterfact", nargs="?", const="default", help="CounterFact file (default: counterfact-edit)")
    p.add_argument("--zsre", nargs="?", const="default", help="zsRE file (default: zsre_mend_train-1k)")
    p.add_argument("--downstream", nargs="?", const="default", help="directory of the downstream task files")
    p.add_argument("--tasks", nargs="*", default=None)
    p.add_argument("--items", type=positive_int, default=100, help="test items per downstream task")
    p.add_argument("--limit", type=positive_int, default=100, help="CounterFact / zsRE cases")
    p.add_argument("--fluency", action="store_true", help="also generation entropy (slower)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="plain",
                   help="score CounterFact/zsRE prompts as plain text, or as the user's message in the chat template")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("stats", help="precompute and cache the second-moment statistics C₀")
    _add_model_args(p, adapter_flag=False)
    p.add_argument("--layers", type=non_negative_int, nargs="+", default=None)
    p.add_argument("--corpus", default=None)
    p.add_argument("--corpus-dataset", default=None, metavar="NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--tokens", type=positive_int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("show", help="an adapter's settings, ledger, norms and fingerprint")
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true", help="everything, with the full ledger, as JSON")
    p.add_argument("--last", type=positive_int, default=10, help="ledger batches to list")
    p.add_argument("--requests", type=non_negative_int, default=5, help="requests of the last batch to list")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("merge", help="write the base model with the edits merged in")
    _add_model_args(p, adapter_flag=False)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write an adapter as a standard PEFT LoRA adapter (for LoRA serving)")
    _add_model_args(p, adapter_flag=False)
    p.add_argument("--adapter", required=True)
    p.add_argument("--lora", required=True, metavar="DIR", help="new or empty directory for the LoRA adapter")
    p.add_argument("--rank", type=positive_int, default=None,
                   help="at most this rank per layer (default: each delta's numerical rank, exact)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="push an adapter directory to the Hub")
    p.add_argument("adapter")
    p.add_argument("repo_id")
    _add_model_args(p, adapter_flag=False)
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None)
    p.add_argument("--endpoint", default=None)
    p.add_argument("--timeout", type=positive_seconds, default=60.0,
                   help="seconds to wait for the Hub to answer each request (default 60)")
    p.add_argument("--no-editing-state", action="store_true", help="push the deltas only (inference use)")
    p.add_argument("--delta-dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.set_defaults(func=cmd_push)

    # Its options are the lifelong runner's own; main() hands them over unparsed.
    p = sub.add_parser("bench", help="the lifelong benchmark (options: hf-encore bench --help)", add_help=False)
    p.set_defaults(func=cmd_bench, rest=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    position = argv.index("bench") if "bench" in argv else -1
    if position >= 0 and all(a in ("--verbose",) for a in argv[:position]):
        args = parser.parse_args(argv[: position + 1])
        args.rest = argv[position + 1:]
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _user_errors() as err:
        if args.verbose:
            raise
        # One line: some library messages (transformers', huggingface_hub's) span several.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"hf-encore {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"hf-encore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
