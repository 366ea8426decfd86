"""Write quantized models in formats serving stacks load, and read them back.

Two formats:

* ``pack-quantized`` (:func:`save_quantized`): the compressed-tensors format llm-compressor writes
  and vLLM serves. The integer codes of every quantized linear are packed into int32
  (``weight_packed``) beside ``weight_scale``, ``weight_zero_point`` (asymmetric grids only) and
  ``weight_shape``; ``config.json`` carries the ``quantization_config``. transformers loads it with
  compressed-tensors installed; :func:`load_quantized` also returns the codes and grids.
* ``fake-quant`` (:func:`save_fake_quant`): the dequantized weights as plain float16 safetensors,
  loadable by any tool, at the size of an unquantized model.

Both are written into a temporary directory beside the target and renamed into place at the
end, so an interrupted run leaves no half-written checkpoint; ``export.json`` in the directory
records the sizes of the quantized layers against the same layers in float16.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import atomic
from .errors import WorkbenchError
from .quant.grid import GridConfig
from .quant.weight import QuantizedWeight

FORMAT_PACKED = "pack-quantized"
FORMAT_FAKE = "fake-quant"
EXPORT_INFO = "export.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INSTALL_HINT = "pip install 'quant-workbench[export]' (or: pip install compressed-tensors)"
# what a directory must hold to be replaced with overwrite=True: guards against `--save ~ --overwrite`
CHECKPOINT_MARKERS = ("config.json", EXPORT_INFO)


@dataclass(frozen=True)
class ExportSettings:
    # dtype of the scales and of every tensor that is not packed (embeddings, norms, lm_head):
    # serving kernels for packed int weights run in float16 or bfloat16
    dtype: str = "float16"
    max_shard_size: str = "5GB"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise WorkbenchError(f"export dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class WeightScheme:
    """The grid every quantized linear shares, in the workbench's terms."""
    bits: int
    group_size: int           # -1: one grid per output channel
    symmetric: bool

    @property
    def offset(self) -> int:
        """Unsigned codes [0, 2^b) minus this are compressed-tensors' signed codes [-2^(b-1), 2^(b-1))."""
        return 2 ** (self.bits - 1)

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size == -1 else "group"

    def quantization_args(self):
        from compressed_tensors.quantization import QuantizationArgs
        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy=self.strategy,
                                group_size=None if self.group_size == -1 else self.group_size)

    @classmethod
    def of(cls, grid: GridConfig) -> "WeightScheme":
        return cls(grid.bits, grid.group_size, grid.symmetric)

    def grid(self) -> GridConfig:
        return GridConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    @classmethod
    def from_args(cls, args) -> "WeightScheme":
        if args.type != "int" or args.strategy not in ("group", "channel"):
            raise WorkbenchError(f"unsupported weight quantization {args.type}/{args.strategy}; the workbench reads "
                                 f"integer weights with group or channel grids")
        return cls(args.num_bits, args.group_size if args.strategy == "group" else -1, args.symmetric)


@dataclass
class ExportInfo:
    """What was written, and how large the quantized linears are on disk against float16."""
    format: str
    dtype: str
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    quantized_layers: int = 0
    quantized_bytes: int = 0       # on disk: every tensor of the quantized linears' weights
    float16_bytes: int = 0         # the same weights in float16
    other_bytes: int = 0           # everything else (embeddings, norms, lm_head, biases)
    total_bytes: int = 0           # all files in the directory
    ratio: float = 0.0             # float16_bytes / quantized_bytes
    layers: list[str] = field(default_factory=list)
    layer_bits: dict[str, int] = field(default_factory=dict)   # mixed precision: each layer's width (bits is None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ExportInfo":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class QuantizedCheckpoint:
    """A pack-quantized checkpoint read back: a dense model plus the codes and grids on disk."""
    model: nn.Module
    tokenizer: object
    packed: dict[str, QuantizedWeight]
    scheme: WeightScheme | None       # None for GGUF files (the types are per tensor) and for mixed precision
                                      # (each layer's grid is its ``packed`` entry's)
    info: ExportInfo | None
    source: str


# -- checks ------------------------------------------------------------------------------------

def require_compressed_tensors():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise WorkbenchError(f"the pack-quantized export needs compressed-tensors: {INSTALL_HINT}") from None


def supported_bits() -> tuple[int, ...]:
    """Bit widths the installed compressed-tensors packs (of the 2-8 the workbench quantizes to)."""
    require_compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    return tuple(b for b in range(2, 9) if PackedQuantizationCompressor.can_compress(
        nn.Linear, QuantizationScheme(targets=["Linear"], weights=WeightScheme(b, -1, True).quantization_args())))


def check_save_dir(path: str | os.PathLike, overwrite: bool = False, packed: bool = True,
                   bits: int | tuple[int, ...] | None = None, keep: tuple = ()) -> Path:
    """Fail before any work if ``path`` cannot take a checkpoint; returns it as a Path.

    ``bits``: the run's bit width (or widths), refused now if the format cannot pack it (not after the run).
    ``keep``: directories that must survive (the model being quantized, the embedded model's cache):
    a target that is one of them, holds one or lies inside one is refused, with ``overwrite`` or not.
    """
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    clean_leftovers(path)   # first: a kill may have left the old checkpoint aside, it is put back
    target = path.resolve()
    for k in keep:
        k = Path(k).expanduser().resolve()
        if target == k or target in k.parents or k in target.parents:
            how = "is" if target == k else ("holds" if target in k.parents else "lies inside")
            raise WorkbenchError(f"save directory {str(path)!r} {how} {str(k)!r}, the model being quantized or the "
                                 f"embedded model's cache; writing there could destroy the source, give another "
                                 f"directory")
    if path.exists() and not path.is_dir():
        raise WorkbenchError(f"save directory {str(path)!r} is a file; give a directory path")
    if path.exists() and not overwrite:
        raise WorkbenchError(f"save directory {str(path)!r} exists; pass --overwrite (overwrite=True) to replace it")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).exists() for m in CHECKPOINT_MARKERS):
        raise WorkbenchError(f"save directory {str(path)!r} is not empty and holds no checkpoint "
                             f"({' or '.join(CHECKPOINT_MARKERS)}); refusing to replace it, give a new directory")
    if not parent.is_dir():
        raise WorkbenchError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise WorkbenchError(f"cannot write {str(path)!r}: directory {str(parent)!r} is not writable")
    if packed:
        require_compressed_tensors()
        wanted = (bits,) if isinstance(bits, int) else tuple(bits or ())
        refused = [b for b in wanted if b not in supported_bits()]
        if refused:
            raise WorkbenchError(f"compressed-tensors cannot pack {', '.join(map(str, refused))}-bit weights; "
                                 f"supported bit widths: {', '.join(map(str, supported_bits()))} (change --bits, or "
                                 f"leave out --save)")
    return path


def layer_schemes(packed) -> dict[str, WeightScheme]:
    """Each quantized layer's grid, read from the layers themselves."""
    return {name: WeightScheme.of(q.grid) for name, q in packed.items()}


def shared_scheme(schemes: dict[str, WeightScheme]) -> WeightScheme | None:
    """The grid every layer shares; None when they differ (mixed precision) or there are none."""
    found = set(schemes.values())
    return found.pop() if len(found) == 1 else None


def schemes_of(result) -> dict[str, WeightScheme]:
    """The grids of a quantize run, by layer, checked against the format."""
    if not result.packed:
        raise WorkbenchError("the run quantized no layers, so there is nothing to export; check --max-blocks")
    schemes = layer_schemes(result.packed)
    bits = supported_bits()
    refused = sorted({s.bits for s in schemes.values()} - set(bits))
    if refused:
        raise WorkbenchError(f"compressed-tensors cannot pack {', '.join(map(str, refused))}-bit weights; supported "
                             f"bit widths: {', '.join(map(str, bits))} (or use save_fake_quant for a float16 export)")
    return schemes


# -- writing ------------------------------------------------------------------------------------

@contextmanager
def staging_dir(target: Path, overwrite: bool, packed: bool):
    """A fresh directory beside ``target`` that replaces it when the block ends without error."""
    target = check_save_dir(target, overwrite, packed)
    tmp = atomic.temp_name(target, "partial")
    tmp.mkdir()   # not mkdtemp: its 0700 mode would stick to the published checkpoint
    try:
        yield tmp
        publish(tmp, target, overwrite, packed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_leftovers(target: Path):
    """What a killed save left beside ``target``: half-written ``.partial`` directories are removed; an
    ``.old`` one is the previous checkpoint, put back if the kill came before the new one took its place."""
    for tmp in atomic.stale(target, "partial"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in atomic.stale(target, "old"):
        if not target.exists():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _sync_tree(directory: Path):
    """Every file of ``directory`` on disk before the rename that publishes it."""
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    atomic.fsync_dir(directory)


def publish(tmp: Path, target: Path, overwrite: bool, packed: bool):
    """Rename ``tmp`` to ``target``; an old ``target`` is moved aside first and removed only afterwards."""
    check_save_dir(target, overwrite, packed)   # something may have appeared there during the run
    _sync_tree(tmp)
    if not target.exists():
        os.rename(tmp, target)
        atomic.fsync_dir(target.parent)
        return
    old = atomic.temp_name(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    atomic.fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied tensors (e.g. lm_head = embeddings) kept under their first name."""
    return unique_tensors(model.state_dict().items())


def unique_tensors(items) -> dict[str, torch.Tensor]:
    """``(name, tensor)`` pairs with tensors that share storage (tied weights) kept under their first name."""
    seen, out = set(), {}
    for name, t in items:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def storable_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale in ``dtype``; one too small for it is raised to its least positive value instead of 0."""
    finfo = torch.finfo(dtype)
    least = finfo.smallest_normal * finfo.eps   # the least subnormal
    return scale.float().clamp(min=least, max=finfo.max).to(dtype)


def check_layer(name: str, layer: QuantizedWeight, weight: torch.Tensor, scheme: WeightScheme):
    d_out, d_in = weight.shape
    groups = 1 if scheme.group_size == -1 else d_in // scheme.group_size
    if tuple(layer.codes.shape) != (d_out, d_in) or tuple(layer.scale.shape) != (d_out, groups) \
            or tuple(layer.zero.shape) != (d_out, groups):
        raise WorkbenchError(f"{name}: packed codes {tuple(layer.codes.shape)} / grid {tuple(layer.scale.shape)} do "
                             f"not fit a {d_out}x{d_in} weight with group size {scheme.group_size}; were the "
                             f"codes changed after the run?")
    top = 2 ** scheme.bits - 1
    if int(layer.codes.max()) > top or float(layer.zero.min()) < 0 or float(layer.zero.max()) > top:
        raise WorkbenchError(f"{name}: codes or zero points outside [0, {top}] for {scheme.bits} bits")
    if scheme.symmetric and not bool((layer.zero == scheme.offset).all()):
        raise WorkbenchError(f"{name}: a symmetric grid must have zero point {scheme.offset} everywhere")
    # the model stores the dequantized weight in its own dtype (float16, bfloat16): compare at that precision
    if not torch.allclose(layer.dequantize().to(weight.dtype).float(), weight.float(), rtol=1e-5, atol=1e-6):
        raise WorkbenchError(f"{name}: the model's weight no longer matches its codes and grid; export the "
                             f"result of quantize() before changing the model")


def compress_layer(name: str, layer: QuantizedWeight, scheme: WeightScheme,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Pack one linear with compressed-tensors, checking that its codes come back unchanged."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme
    qscheme = QuantizationScheme(targets=["Linear"], weights=scheme.quantization_args(), format=FORMAT_PACKED)
    scale = storable_scale(layer.scale, dtype)
    # the library re-derives codes as round(w / scale) + zp from a dequantized weight: build that weight
    # from the stored scale so the division lands on our integers exactly
    state = {"weight": layer.dequantize(scale), "weight_scale": scale,
             "weight_zero_point": (layer.zero.round().to(torch.int16) - scheme.offset).to(torch.int8)}
    out = PackedQuantizationCompressor.compress(state, qscheme)
    back = unpack_from_int32(out["weight_packed"], scheme.bits, layer.codes.shape).to(torch.int16) + scheme.offset
    if not torch.equal(back, layer.codes.to(torch.int16)):
        raise RuntimeError(f"{name}: packing changed the integer codes; the export would not match the model")
    return {k: v.contiguous() for k, v in out.items()}


def quantization_config(model: nn.Module, packed: dict, schemes: dict[str, WeightScheme]):
    """compressed-tensors config: one group for every quantized linear when they share a grid, else one group
    per grid listing its layers by name (what llm-compressor writes for mixed precision); the other linears
    ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
    for name in packed:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise WorkbenchError(f"{name} is not a Linear layer of the model; only linears can be packed")
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in packed]
    one = shared_scheme(schemes)
    if one is not None:
        targets = {one: ["Linear"]}
    else:
        targets = {}
        for name in sorted(schemes):
            targets.setdefault(schemes[name], []).append(name)
    ordered = sorted(targets, key=lambda s: (s.bits, s.group_size, s.symmetric))
    groups = {f"group_{i}": QuantizationScheme(targets=targets[s], weights=s.quantization_args(), format=FORMAT_PACKED)
              for i, s in enumerate(ordered)}
    return QuantizationConfig(config_groups=groups, format=FORMAT_PACKED, ignore=ignore,
                              quantization_status=QuantizationStatus.COMPRESSED)


def write_model_files(tmp: Path, result, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                      settings: ExportSettings):
    from huggingface_hub import save_torch_state_dict
    save_torch_state_dict(tensors, tmp, max_shard_size=settings.max_shard_size, metadata={"format": "pt"})
    write_side_files(tmp, result.model, result.tokenizer, dtype)


def write_side_files(tmp: Path, model, tokenizer, dtype: torch.dtype):
    """Config (in the export's dtype), generation config and tokenizer beside the weights."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    # the safetensors writer leaves its files private (0600); give them the mode config.json got from the umask
    mode = (tmp / "config.json").stat().st_mode & 0o777
    for f in tmp.glob("*.safetensors*"):
        os.chmod(f, mode)


def load_dequantized(config_file: Path):
    """Have transformers unpack asymmetric checkpoints while loading.

    compressed-tensors 0.20 builds its compressed modules with an unpacked zero point, so the
    packed one in the checkpoint (the layout vLLM reads) is refused as a size mismatch when
    transformers loads into them. ``dequantize`` is a transformers loading attribute that takes
    the other route, unpacking through the same compressor; vLLM reads only the keys it knows. That
    route reads one scheme for every layer, so a mixed-precision checkpoint is not sent there: transformers
    reads it on the compressed route, right with symmetric grids, and refuses asymmetric ones' packed zero
    points rather than unpacking layers on the wrong widths.
    """
    config = json.loads(config_file.read_text())
    config["quantization_config"]["dequantize"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_quantized(result, path: str | os.PathLike, overwrite: bool = False,
                   settings: ExportSettings | None = None, progress=None) -> ExportInfo:
    """Write ``result`` (from :func:`workbench.quantize`) as a compressed-tensors pack-quantized checkpoint.

    The quantized linears hold int32-packed codes, ``weight_scale`` and (asymmetric grids) packed
    ``weight_zero_point``; everything else is stored in ``settings.dtype``. Returns the sizes, also
    written to ``export.json``. vLLM's kernels for this format serve 4- and 8-bit weights.
    ``progress(done, total)`` is told the model's tensors converted (packing is most of the time).
    """
    settings = settings or ExportSettings()
    path = check_save_dir(path, overwrite)
    schemes = schemes_of(result)
    dtype = settings.torch_dtype
    state = unique_state(result.model)
    tensors, quantized_names = {}, []
    for name, t in counted(state.items(), len(state), progress):
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in result.packed:
            check_layer(module, result.packed[module], t, schemes[module])
            for k, v in compress_layer(module, result.packed[module], schemes[module], dtype).items():
                tensors[f"{module}.{k}"] = v
                quantized_names.append(f"{module}.{k}")
        else:
            tensors[name] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    missing = set(result.packed) - {n.rsplit(".", 1)[0] for n in quantized_names}
    if missing:
        raise WorkbenchError(f"packed layers not found in the model: {', '.join(sorted(missing))}")
    from compressed_tensors.compressors import ModelCompressor
    qconfig = quantization_config(result.model, result.packed, schemes)
    with staging_dir(path, overwrite, packed=True) as tmp:
        write_model_files(tmp, result, tensors, dtype, settings)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        if not all(s.symmetric for s in schemes.values()) and shared_scheme(schemes) is not None:
            load_dequantized(tmp / "config.json")
        info = measure(tmp, FORMAT_PACKED, settings.dtype, numels(result.packed), schemes)
        (tmp / EXPORT_INFO).write_text(json.dumps(info.to_dict(), indent=2))
    return info


def save_fake_quant(result, path: str | os.PathLike, overwrite: bool = False,
                    settings: ExportSettings | None = None, progress=None) -> ExportInfo:
    """Write the dequantized model as plain safetensors (float16 unless ``settings`` say otherwise).

    Every tool that reads transformers checkpoints loads it; it is as large as an unquantized model.
    """
    settings = settings or ExportSettings()
    path = check_save_dir(path, overwrite, packed=False)
    dtype = settings.torch_dtype
    state = unique_state(result.model)
    tensors = {n: (t.detach().to(dtype) if t.is_floating_point() else t.detach())
               for n, t in counted(state.items(), len(state), progress)}
    packed = getattr(result, "packed", None) or {}
    with staging_dir(path, overwrite, packed=False) as tmp:
        write_model_files(tmp, result, tensors, dtype, settings)
        info = measure(tmp, FORMAT_FAKE, settings.dtype, numels(packed), layer_schemes(packed))
        (tmp / EXPORT_INFO).write_text(json.dumps(info.to_dict(), indent=2))
    return info


def counted(items, total: int, progress=None):
    """``items``, telling ``progress(done, total)`` at 0 and after each one."""
    if progress is None:
        yield from items
        return
    progress(0, total)
    for i, item in enumerate(items):
        yield item
        progress(i + 1, total)


# -- sizes ---------------------------------------------------------------------------------------

def safetensors_sizes(path: Path) -> dict[str, int]:
    """Bytes each tensor takes in the directory's safetensors files, read from their headers."""
    sizes = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                sizes[name] = end - start
    return sizes


def numels(packed) -> dict[str, int]:
    """Weights per quantized layer (a ``PackedSpill`` knows its shapes without reading the codes)."""
    shape = getattr(packed, "shape", None)
    return {n: (shape(n)[0] * shape(n)[1] if shape else packed[n].codes.numel()) for n in packed}


def measure(path: Path, fmt: str, dtype: str, sizes_of: dict[str, int],
            schemes: dict[str, WeightScheme]) -> ExportInfo:
    """``sizes_of``: weights per quantized layer; ``schemes``: their grids. A grid field the layers do not
    share (the bits of a mixed-precision run) is None, and ``layer_bits`` then gives each layer's width."""
    sizes = safetensors_sizes(path)
    layers = sorted(sizes_of)
    prefixes = tuple(f"{n}.weight" for n in layers)   # .weight, .weight_packed, .weight_scale, ...
    quantized = sum(b for k, b in sizes.items() if k.startswith(prefixes))
    float16 = sum(sizes_of[n] * 2 for n in layers)
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    common = lambda field: _common(getattr(s, field) for s in schemes.values())  # noqa: E731
    bits = common("bits")
    return ExportInfo(format=fmt, dtype=dtype, bits=bits, group_size=common("group_size"),
                      symmetric=common("symmetric"), quantized_layers=len(layers), quantized_bytes=quantized,
                      float16_bytes=float16, other_bytes=sum(sizes.values()) - quantized, total_bytes=total,
                      ratio=float16 / quantized if quantized else 0.0, layers=layers,
                      layer_bits={} if bits is not None else {n: schemes[n].bits for n in layers if n in schemes})


def _common(values):
    found = set(values)
    return found.pop() if len(found) == 1 else None


# -- reading -------------------------------------------------------------------------------------

def read_quantization_config(path: Path):
    from compressed_tensors.quantization import QuantizationConfig
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WorkbenchError(f"{str(path)!r} holds no config.json; point at a directory written by save_quantized")
    raw = json.loads(config_file.read_text()).get("quantization_config")
    if not raw or raw.get("quant_method") != "compressed-tensors" or raw.get("format") != FORMAT_PACKED:
        raise WorkbenchError(f"{str(path)!r} is not a compressed-tensors {FORMAT_PACKED} checkpoint; load other "
                             f"checkpoints (e.g. fake-quant exports) with workbench.load_model")
    known = set(QuantizationConfig.model_fields)
    return QuantizationConfig.model_validate({k: v for k, v in raw.items() if k in known})


def layer_scheme_reader(qconfig, path: Path):
    """``name -> WeightScheme`` of a checkpoint's packed layers: one group targeting every ``Linear``, or
    one group per grid naming its layers (mixed precision), as ``save_quantized`` writes them."""
    groups = list(qconfig.config_groups.values())
    if not groups or any(g.weights is None for g in groups):
        raise WorkbenchError(f"{str(path)!r} is not a weight-only checkpoint; the workbench reads what save_quantized "
                             f"writes (load others with transformers)")
    if len(groups) == 1 and groups[0].targets == ["Linear"]:
        one = WeightScheme.from_args(groups[0].weights)
        return lambda name: one
    by_name = {}
    for g in groups:
        scheme = WeightScheme.from_args(g.weights)
        for target in g.targets:
            if target == "Linear" or target.startswith("re:"):
                raise WorkbenchError(f"{str(path)!r} has several quantization groups, one targeting {target!r}; the "
                                     f"workbench reads groups that name their layers, as save_quantized writes them "
                                     f"(load others with transformers)")
            by_name[target] = scheme

    def scheme_of(name: str) -> WeightScheme:
        if name not in by_name:
            raise WorkbenchError(f"{str(path)!r}: the packed layer {name} is in no quantization group of its config")
        return by_name[name]
    return scheme_of


def read_packed(path: Path, scheme_of) -> dict[str, QuantizedWeight]:
    """Codes and grids of every packed linear (``scheme_of``: its name -> its grid), back in the workbench's
    unsigned convention."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k.rsplit(".", 1)[-1].startswith("weight_"):
                    tensors[k] = fh.get_tensor(k)
    out = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        name = key[: -len(".weight_packed")]
        scheme = scheme_of(name)
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        scale = tensors[f"{name}.weight_scale"]
        codes = unpack_from_int32(tensors[key], scheme.bits, shape).to(torch.int16) + scheme.offset
        if scheme.symmetric:
            zero = torch.full(scale.shape, float(scheme.offset))
        else:
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], scheme.bits,
                                   torch.Size((shape[0], scale.shape[-1])), packed_dim=0)
            zero = (zp.to(torch.int16) + scheme.offset).float()
        out[name] = QuantizedWeight(codes.to(torch.uint8), scale.float(), zero, scheme.grid())
    return out


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> QuantizedCheckpoint:
    """Load a checkpoint written by :func:`save_quantized` through transformers + compressed-tensors.

    The model comes back dense in ``dtype`` (float32 matches the in-memory quantized model),
    with the codes and grids read from disk in ``packed``. A mixed-precision checkpoint is built
    from its codes here (see ``dense_from_codes``).
    """
    require_compressed_tensors()
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from .models.loading import quiet_transformers
    path = Path(path).expanduser()
    if not path.is_dir():
        raise WorkbenchError(f"{str(path)!r} is not a directory; point at a directory written by save_quantized")
    packed = read_packed(path, layer_scheme_reader(read_quantization_config(path), path))
    scheme = shared_scheme(layer_schemes(packed))
    quiet_transformers()
    if scheme is None:
        model = dense_from_codes(path, dtype, packed)
    else:
        with warnings.catch_warnings():
            # transformers warns that the passed loading attribute overrides the checkpoint's: that is the point
            warnings.filterwarnings("ignore", message=".*quantization_config.*")
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = ExportInfo.from_json(path / EXPORT_INFO) if (path / EXPORT_INFO).is_file() else None
    return QuantizedCheckpoint(model, tokenizer, packed, scheme, info, str(path))


def dense_from_codes(path: Path, dtype: torch.dtype, packed: dict[str, QuantizedWeight]) -> nn.Module:
    """The model of a mixed-precision checkpoint: its stored tensors, and the packed layers' weights rebuilt
    from their codes.

    transformers (5.x) dequantizes every layer at load with the first config group's scheme, and its
    other route refuses packed zero points (see ``load_dequantized``), so neither reads several widths.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    prefixes = tuple(f"{n}.weight" for n in packed)
    stored = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            stored.update({k: fh.get_tensor(k) for k in fh.keys() if not k.startswith(prefixes)})
    missing, unexpected = model.load_state_dict(stored, strict=False)
    for name, q in packed.items():
        model.get_submodule(name).weight.data = q.dequantize().to(dtype)
    # a tied tensor (lm_head = embeddings) is stored once, under its first name
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in stored or k.startswith(prefixes)}
    left = [k for k in missing if not k.startswith(prefixes) and model.state_dict()[k].data_ptr() not in loaded]
    if left or unexpected:
        raise WorkbenchError(f"{str(path)!r} does not fit its config: missing {', '.join(left) or 'nothing'}, "
                             f"unexpected {', '.join(unexpected) or 'nothing'}")
    return model
