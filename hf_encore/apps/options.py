"""What the command-line applications share: the one-line user error and the parsing of settings and numbers.

``hf-encore``, ``python -m hf_encore.apps.lifelong`` and the benchmarks take algorithm settings as ``--set
KEY=VALUE`` and report a bad value as one line before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from typing import Any, Sequence


class UsageError(ValueError):
    """A problem with what the user asked for, reported as one line."""


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: the dtype the base model's weights are loaded in (every command that loads a model)."""
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype the base model's weights are loaded in (default float32)")


def parse_value(text: str) -> Any:
    """A setting's value from the command line: JSON (``0.1``, ``false``, ``[4, 8]``), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``["norm_weight=0.1", "mpes=false"]`` → ``{"norm_weight": 0.1, "mpes": False}`` (the ``--set`` options of
    every command, benchmark and sweep)."""
    from ..config import SETTINGS, EncoreConfig, check_given_setting

    settings = {}
    known = {f.name for f in dataclasses.fields(EncoreConfig) if f.init}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(SETTINGS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else "; see hf_encore/config.py for the settings"
            raise UsageError(f"--set {key}: unknown EncoreConfig setting{hint}")
        settings[key] = parse_value(value)
        if key in SETTINGS:  # checked here so that every command fails before it loads a model
            try:
                settings[key] = check_given_setting(key, settings[key])
            except ValueError as err:
                raise UsageError(f"--set {key}={value}: {err}") from None
    return settings


def _number_type(kind: type, low: float, *, strict: bool = False):
    """An argparse ``type=`` for a number ``≥ low`` (``> low`` when ``strict``): argparse then reports a bad value
    with the option's name and exits 2 before any command runs."""
    bound = f"{'>' if strict else '≥'} {low:g}"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text!r}") from None
        if kind is float and not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"  # argparse names the type in some messages
    return parse


positive_int = _number_type(int, 1)
non_negative_int = _number_type(int, 0)
positive_seconds = _number_type(float, 0, strict=True)
