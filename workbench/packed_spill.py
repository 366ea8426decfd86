"""The quantized layers of an offloaded run, on disk: a mapping name -> ``QuantizedWeight``.

An in-memory run keeps every layer's codes (one byte per weight) and grids; for a model larger
than memory that alone grows with the depth. Here each layer is written when it is recorded, as
its own small safetensors file with the exact tensors (uint8 codes, float32 scales and zero
points), and read back when asked for: a quantized block is re-assembled from the checkpoint and
these files, and the export reads them block by block.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import MutableMapping


from .quant.grid import GridConfig
from .quant.weight import QuantizedWeight
from .scratch import Scratch


class PackedSpill(MutableMapping):
    def __init__(self):
        self._scratch = Scratch("packed")
        self._files: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, int]] = {}

    def __setitem__(self, name: str, q: QuantizedWeight):
        from safetensors.torch import save_file
        path = self._scratch.file("layer.safetensors")
        save_file({"codes": q.codes.detach().cpu().contiguous(), "scale": q.scale.detach().cpu().contiguous(),
                   "zero": q.zero.detach().cpu().contiguous()}, str(path),
                  metadata={"grid": json.dumps(dataclasses.asdict(q.grid))})
        self._files[name] = str(path)
        self._shapes[name] = tuple(q.codes.shape)

    def __getitem__(self, name: str) -> QuantizedWeight:
        from safetensors import safe_open
        path = self._files[name]
        with safe_open(path, framework="pt") as f:
            # cloned: a tensor read straight from the file keeps its memory map (and its pages) alive
            t = {k: f.get_tensor(k).clone() for k in ("codes", "scale", "zero")}
            grid = GridConfig(**json.loads(f.metadata()["grid"]))
        return QuantizedWeight(t["codes"], t["scale"], t["zero"], grid)

    def __delitem__(self, name: str):
        del self._files[name], self._shapes[name]

    def __iter__(self):
        return iter(self._files)

    def __len__(self):
        return len(self._files)

    def __contains__(self, name) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, int]:
        """A layer's ``[d_out, d_in]`` without reading it."""
        return self._shapes[name]

    def close(self):
        self._scratch.close()
