"""Export as you go: an offloaded run's checkpoint written one block at a time.

The quantized model never exists in memory whole: each block's tensors are written, as one
safetensors shard, when the engine is done with the block (``add_block``); the blocks a run leaves
in full precision (``--max-blocks``) and the tensors outside the blocks are written by ``finish``,
with the shard index, the config and the tokenizer. The tensors are the ones ``save_quantized`` /
``save_fake_quant`` write for the same run in memory, only spread over shards.

Everything goes into a ``.partial`` directory beside the target, renamed into place at the end by
the same ``export.publish`` the in-memory export uses: a run that fails, is cancelled or is killed
leaves no partial checkpoint under the target's name (a killed one leaves the ``.partial``
directory, which the next save to that target removes).
"""
from __future__ import annotations

import json
import shutil

import torch

from . import atomic
from .errors import Cancelled, WorkbenchError
from .export import (EXPORT_INFO, FORMAT_FAKE, FORMAT_PACKED, ExportInfo, ExportSettings, WeightScheme,
                     check_layer, check_save_dir, compress_layer, load_dequantized, measure, numels, publish,
                     quantization_config, supported_bits, unique_tensors, write_side_files)
from .models.streamed import StreamedModel

INDEX = "model.safetensors.index.json"


class StreamingExport:
    """The checkpoint of ``model`` (a streamed model, quantized layers in ``packed``) in ``fmt``."""

    def __init__(self, model: StreamedModel, tokenizer, path, fmt: str, packed, grid=None, overwrite: bool = False,
                 settings: ExportSettings | None = None):
        if fmt not in (FORMAT_PACKED, FORMAT_FAKE):
            raise WorkbenchError(f"--format {fmt} is written from the whole model in memory; with --offload disk "
                                 f"save as {FORMAT_PACKED} or {FORMAT_FAKE}")
        self.model, self.tokenizer, self.fmt, self.packed = model, tokenizer, fmt, packed
        self.settings = settings or ExportSettings()
        self.dtype = self.settings.torch_dtype
        self.overwrite = overwrite
        self.scheme = None if grid is None else WeightScheme.of(grid)
        if fmt == FORMAT_PACKED and self.scheme is not None and self.scheme.bits not in supported_bits():
            raise WorkbenchError(f"compressed-tensors cannot pack {self.scheme.bits}-bit weights; supported bit "
                                 f"widths: {', '.join(map(str, supported_bits()))}")
        self.path = check_save_dir(path, overwrite, packed=fmt == FORMAT_PACKED)
        self.tmp = atomic.temp_name(self.path, "partial")
        self.tmp.mkdir()   # not mkdtemp: its 0700 mode would stick to the published checkpoint
        self.shards = model.n_blocks + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.written: set[int] = set()

    def _shard(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.shards:05d}.safetensors"

    def _write(self, i: int, tensors: dict[str, torch.Tensor]):
        from safetensors.torch import save_file
        name = self._shard(i)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.tmp / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total_size += v.numel() * v.element_size()

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return t.to(self.dtype) if t.is_floating_point() else t

    def add_block(self, b: int, block: torch.nn.Module):
        """Write block ``b`` (its final weights, the quantized ones dequantized in place) as its shard."""
        prefix = f"{self.model.family.blocks_path}.{b}."
        tensors = {}
        for n, t in block.state_dict().items():
            name = prefix + n
            module = name.rsplit(".", 1)[0]
            if self.fmt == FORMAT_PACKED and n.endswith(".weight") and module in self.packed:
                q = self.packed[module]
                scheme = WeightScheme.of(q.grid)
                if self.scheme is not None and scheme != self.scheme:
                    raise WorkbenchError(f"{module} was quantized on another grid than the run's; this format "
                                         f"stores one grid for every layer")
                self.scheme = scheme
                check_layer(module, q, t, scheme)
                for k, v in compress_layer(module, q, scheme, self.dtype).items():
                    tensors[f"{module}.{k}"] = v
            else:
                tensors[name] = self._stored(t)
        self._write(b, tensors)
        self.written.add(b)

    def finish(self, cancel=None) -> ExportInfo:
        """Write what is left and publish the checkpoint; returns its sizes (also in ``export.json``)."""
        source = self.model if self.model.packed is self.packed else self.model.view(self.packed)
        for b in range(self.model.n_blocks):
            if b not in self.written:       # left in full precision by --max-blocks, or a finished run saved now
                if cancel is not None and cancel.is_set():
                    raise Cancelled("run cancelled during export")
                self.add_block(b, source.block(b))
        blocks = self.model.family.blocks_path + "."
        rest = unique_tensors((n, t) for n, t in self.model.skeleton.state_dict().items() if not n.startswith(blocks))
        self._write(self.shards - 1, {n: self._stored(t) for n, t in rest.items()})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=2))
        write_side_files(self.tmp, self.model.skeleton, self.tokenizer, self.dtype)
        if self.fmt == FORMAT_PACKED:
            if not self.packed:
                raise WorkbenchError("the run quantized no layers, so there is nothing to export; check --max-blocks")
            from compressed_tensors.compressors import ModelCompressor
            qconfig = quantization_config(self.model.skeleton, self.packed, dict.fromkeys(self.packed, self.scheme))
            ModelCompressor(quantization_config=qconfig).update_config(str(self.tmp))
            if not self.scheme.symmetric:
                load_dequantized(self.tmp / "config.json")
        info = measure(self.tmp, self.fmt, self.settings.dtype, numels(self.packed),
                       {} if self.scheme is None else dict.fromkeys(self.packed, self.scheme))
        (self.tmp / EXPORT_INFO).write_text(json.dumps(info.to_dict(), indent=2))
        publish(self.tmp, self.path, self.overwrite, self.fmt == FORMAT_PACKED)
        return info

    def abort(self):
        """Remove what was written (a failed or cancelled run)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def save_streamed(model: StreamedModel, tokenizer, packed, path, fmt: str, grid=None, overwrite: bool = False,
                  cancel=None) -> ExportInfo:
    """A finished offloaded run (``model`` with its ``packed`` layers) written block by block."""
    export = StreamingExport(model, tokenizer, path, fmt, packed, grid, overwrite)
    try:
        return export.finish(cancel)
    except BaseException:
        export.abort()
        raise
