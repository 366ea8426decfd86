"""Models larger than memory: the checkpoint's blocks stay in their safetensors files.

``load_streamed`` builds the model on the meta device (accelerate's ``init_empty_weights``: the
modules and their shapes, no storage), then loads what every forward needs and is small next to
the blocks: the embeddings, the final norm, the head, the rotary tables. A ``StreamedModel``
hands out one block at a time (``block(b, device)``): a fresh module read tensor by tensor from
the files (safetensors' ``safe_open``) in the dtype the checkpoint stores, on the device the
caller wants, freed when the caller drops it. Its ``packed`` layers (a quantized view) replace
the stored weights by their dequantized codes as the block is built, exactly as an in-memory run
leaves them in its model.

A ``StreamedModel`` reads like the model for what does not need the blocks' weights (``config``,
``model.layers`` on the meta device, the embeddings); ``view()`` gives a second one that shares
the loaded tensors but has its own module tree, so walks that briefly swap a block (catching the
first block's inputs) never touch another run's.
"""
from __future__ import annotations

import copy
import json
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WorkbenchError
from . import Family

INDEX = "model.safetensors.index.json"
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass
class Residency:
    """Bytes of model weights in memory: the loaded parts, plus the blocks handed out and not yet freed."""
    resident: int = 0
    blocks: int = 0
    peak: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return self.resident + self.blocks

    def add_block(self, n: int):
        with self._lock:
            self.blocks += n
            self.peak = max(self.peak, self.total)

    def drop_block(self, n: int):
        with self._lock:
            self.blocks -= n

    def reset_peak(self):
        self.peak = self.total


class TensorFiles:
    """Which safetensors file holds each tensor of a checkpoint directory; reads a few at a time."""

    def __init__(self, directory: Path):
        from safetensors import safe_open
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {name: self.directory / f for name, f in weight_map.items()}
        else:
            self.where = {}
            for f in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as fh:
                    self.where.update({k: f for k in fh.keys()})
        if not self.where:
            raise WorkbenchError(f"{str(directory)!r} holds no safetensors weights; --offload disk reads tensors one "
                                 f"at a time from *.safetensors files (save the model with save_pretrained, which "
                                 f"writes them), or run with --offload none")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def first_float_dtype(self) -> torch.dtype | None:
        from safetensors import safe_open
        first = next(iter(sorted(set(self.where.values()))))
        with safe_open(str(first), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                         "F64": torch.float64}.get(sl.get_dtype())
                if dtype is not None:
                    return dtype
        return None

    def read(self, wanted: dict[str, tuple[torch.dtype, torch.device]]) -> dict[str, torch.Tensor]:
        """``{name: (dtype, device)}`` -> the tensors, copied out of the files.

        Each file is opened for the read and closed after it: a tensor straight from ``safe_open`` is
        a view of the file's memory map, and would keep every page it touched resident.
        """
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.where[name], []).append(name)
        out = {}
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for name in names:
                    dtype, device = wanted[name]
                    t = fh.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
                    del t
        return out


def _assign(root: nn.Module, name: str, tensor: torch.Tensor, parameter: bool):
    """Put ``tensor`` in place of the (meta) parameter or buffer ``name``; a Parameter is set as it is."""
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    if parameter:
        if not isinstance(tensor, nn.Parameter):    # as from_pretrained leaves them: trainable floats
            tensor = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor


def _persistent_buffers(module: nn.Module) -> set[str]:
    keys = set(module.state_dict(keep_vars=True))
    return {n for n, _ in module.named_buffers() if n in keys}


class StreamedModel:
    """A causal LM whose blocks are read from disk when asked for (see the module's note)."""

    def __init__(self, skeleton: nn.Module, family: Family, files: TensorFiles, residency: Residency,
                 packed=None, source: str = ""):
        self.skeleton, self.family, self.files, self.residency = skeleton, family, files, residency
        self.packed = packed
        self.source = source

    # -- what reads like the model ------------------------------------------------------------
    def __getattr__(self, name):
        if name.startswith("__") or name in ("skeleton", "family", "files", "residency", "packed", "source"):
            raise AttributeError(name)
        return getattr(self.skeleton, name)

    def __call__(self, *args, **kwargs):
        return self.skeleton(*args, **kwargs)

    def to(self, *args, **kwargs) -> "StreamedModel":
        """The loaded parts stay on the CPU; blocks go where ``block`` is asked to put them."""
        return self

    def eval(self) -> "StreamedModel":
        return self

    @property
    def n_blocks(self) -> int:
        return len(self.family.blocks(self.skeleton))

    def resident_tensors(self) -> list[torch.Tensor]:
        """The loaded tensors (not the blocks'), each once."""
        seen, out = set(), []
        for t in list(self.skeleton.parameters()) + list(self.skeleton.buffers()):
            if t.device.type != "meta" and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def block_bytes(self, b: int = 0) -> int:
        block = self.family.blocks(self.skeleton)[b]
        return sum(p.numel() * p.element_size() for p in block.parameters())

    # -- views and blocks -------------------------------------------------------------------
    def view(self, packed=None) -> "StreamedModel":
        """Another model on the same files and loaded tensors, with its own modules; ``packed``: the
        quantized layers it carries (None: the checkpoint's own weights)."""
        memo = {id(t): t for t in self.resident_tensors()}
        return StreamedModel(copy.deepcopy(self.skeleton, memo), self.family, self.files, self.residency, packed,
                             self.source)

    def block(self, b: int, device: torch.device | str = "cpu") -> nn.Module:
        """Block ``b`` as a module of its own on ``device``, its weights read from the files now."""
        device = torch.device(device)
        prefix = f"{self.family.blocks_path}.{b}."
        block = copy.deepcopy(self.family.blocks(self.skeleton)[b])
        quantized = {}
        if self.packed is not None:
            for kind in self.family.linears:
                name = self.family.layer_name(b, kind)
                if name in self.packed:
                    quantized[f"{self.family.linears[kind]}.weight"] = self.packed[name]
        params = dict(block.named_parameters())
        buffers = {n for n in _persistent_buffers(block) if prefix + n in self.files}
        wanted = {}
        for n, p in params.items():
            if n in quantized:
                continue
            if prefix + n not in self.files:
                raise WorkbenchError(f"the checkpoint has no tensor {prefix + n}; it does not match its config.json")
            wanted[prefix + n] = (p.dtype, device)
        for n in buffers:
            wanted[prefix + n] = (dict(block.named_buffers())[n].dtype, device)
        tensors = self.files.read(wanted)
        for n, p in params.items():
            if n in quantized:
                q = quantized[n]
                # dequantized where the engine dequantizes it (its device), in the model's dtype, as it left it
                weight = q.dequantize() if device.type == "cpu" else \
                    type(q)(q.codes.to(device), q.scale.to(device), q.zero.to(device), q.grid).dequantize()
                _assign(block, n, weight.to(device=device, dtype=p.dtype), parameter=True)
            else:
                _assign(block, n, tensors.pop(prefix + n), parameter=True)
        for n in buffers:
            _assign(block, n, tensors.pop(prefix + n), parameter=False)
        block.to(device)            # buffers the checkpoint does not store (computed at construction)
        block.eval()
        size = sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))
        self.residency.add_block(size)
        weakref.finalize(block, self.residency.drop_block, size)
        return block

    def loss_sums(self, windows, device="cpu", batch_size: int = 4, progress=None, cancel=None, pool=None):
        from ..evaluate_streamed import streamed_loss_sums
        return streamed_loss_sums(self, windows, device, batch_size, progress, cancel, pool)


def is_streamed(model) -> bool:
    return isinstance(model, StreamedModel)


# -- loading ------------------------------------------------------------------------------------

def local_directory(source: str) -> Path:
    """The checkpoint directory of ``source``: itself, or the hub's local snapshot of it."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES))
    except Exception as exc:   # offline, unknown repo, no access: what the hub client raises varies
        raise WorkbenchError(f"model {source!r} could not be fetched for --offload disk: {type(exc).__name__}; it "
                             f"needs the hub or its local cache (offline? set HF_HUB_OFFLINE=1 and pre-download "
                             f"it)") from None


def stored_dtype(config, files: TensorFiles) -> torch.dtype:
    """What ``from_pretrained(dtype="auto")`` picks: the config's dtype, else the first floating tensor's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return files.first_float_dtype() or torch.get_default_dtype()


def skeleton_of(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model on the meta device: modules and shapes, no weights (buffers computed as usual)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def _checkpoint_name(files: TensorFiles, name: str, prefix: str) -> str | None:
    """``name`` as the checkpoint spells it (a base-model checkpoint has no ``model.`` prefix)."""
    for candidate in (name, name[len(prefix) + 1:] if name.startswith(prefix + ".") else None, f"{prefix}.{name}"):
        if candidate and candidate in files:
            return candidate
    return None


def load_resident(skeleton: nn.Module, family: Family, files: TensorFiles) -> int:
    """Load every tensor outside the blocks; returns their bytes. Tied weights stay tied."""
    blocks = family.blocks_path + "."
    prefix = getattr(skeleton, "base_model_prefix", "model")
    groups: dict[int, list[str]] = {}
    for n, p in skeleton.named_parameters(remove_duplicate=False):
        if not n.startswith(blocks):
            groups.setdefault(id(p), []).append(n)
    params = {id(p): p for p in skeleton.parameters()}
    for pid, names in groups.items():
        found = next((c for c in (_checkpoint_name(files, n, prefix) for n in names) if c), None)
        if found is None:
            continue        # a tied copy the checkpoint leaves out: tied below
        t = files.read({found: (params[pid].dtype, torch.device("cpu"))})[found]
        shared = nn.Parameter(t, requires_grad=t.is_floating_point())
        for n in names:
            _assign(skeleton, n, shared, parameter=True)
    for n in _persistent_buffers(skeleton):
        found = None if n.startswith(blocks) else _checkpoint_name(files, n, prefix)
        if found is not None:
            b = skeleton.get_buffer(n)
            _assign(skeleton, n, files.read({found: (b.dtype, torch.device("cpu"))})[found], parameter=False)
    skeleton.tie_weights()
    missing = [n for n, p in skeleton.named_parameters() if p.device.type == "meta" and not n.startswith(blocks)]
    if missing:
        raise WorkbenchError(f"the checkpoint has no tensor {missing[0]}; it does not match its config.json")
    seen, total = set(), 0
    for t in list(skeleton.parameters()) + list(skeleton.buffers()):
        if t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def load_streamed(spec: str, trust_remote_code: bool = False):
    """``--model`` with its blocks left on disk: a ``LoadedModel`` whose ``model`` is a ``StreamedModel``."""
    from transformers import AutoTokenizer, GenerationConfig

    from .loading import LoadedModel, model_config, quiet_transformers, resolve
    quiet_transformers()
    source = resolve(spec)
    config = model_config(spec, source, trust_remote_code)     # an unknown model is refused as load_model does
    directory = local_directory(source)
    from . import family_for
    family = family_for(config)
    files = TensorFiles(directory)
    skeleton = skeleton_of(config, stored_dtype(config, files), trust_remote_code)
    types = set(getattr(config, "layer_types", None) or ())
    if len(types) > 1:
        raise WorkbenchError(f"model {spec!r} mixes attention types across its layers ({', '.join(sorted(types))}); "
                             f"--offload disk walks models whose layers share one, run it with --offload none")
    residency = Residency(resident=load_resident(skeleton, family, files))
    if (directory / "generation_config.json").is_file():
        skeleton.generation_config = GenerationConfig.from_pretrained(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"model {spec!r} could not be loaded: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}; check that the "
                             f"checkpoint is complete") from None
    return LoadedModel(spec, StreamedModel(skeleton, family, files, residency, source=source), tokenizer, family,
                       source)
