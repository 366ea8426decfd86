"""``--offload``: where the model's blocks live during a run.

``none``: the whole model in memory (each block moved to the device for its turn). ``disk``: the
blocks stay in the checkpoint's safetensors files and are read one at a time when the engine, the
perplexity or a walk reaches them (``models.streamed``); quantized layers go to a ``PackedSpill``
and, with ``--save``, each finished block straight into the export (``export_stream``). ``auto``:
``disk`` when the in-memory run (the model in its stored dtype plus the run's own peak, the same
estimate that refuses runs that cannot fit) would not fit in the free memory.
"""
from __future__ import annotations

import torch

from .errors import WorkbenchError
from .memory import HEADROOM, available_bytes, estimate
from .methods import method_spec
from .models.streamed import StreamedModel, is_streamed

NONE, DISK, AUTO = "none", "disk", "auto"
OFFLOADS = (NONE, DISK, AUTO)


class DiskBlocks:
    """The engine's blocks read from the checkpoint when it reaches them; each finished block goes to the
    export (when the run saves) and is then dropped."""

    def __init__(self, model: StreamedModel, export=None):
        self.model, self.export = model, export

    def fetch(self, b: int, device: torch.device):
        return self.model.block(b, device)

    def finish(self, b: int, block):
        if self.export is not None:
            self.export.add_block(b, block)


def in_memory_bytes(cfg, copies: int = 0, loaded_already: bool = False) -> int:
    """What the run would take with the model in memory: the model as loaded (its stored dtype),
    ``copies`` more, and the run's own peak. Read from the config on the meta device, nothing loaded."""
    from .models.loading import model_config, resolve
    from .models.streamed import skeleton_of
    config = model_config(cfg.model, resolve(cfg.model))
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    skeleton = skeleton_of(config, dtype)
    spec = method_spec(cfg.method)
    est = estimate(cfg, skeleton, copies=copies + (0 if loaded_already else 1), attention_aware=spec.attention_aware,
                   fp_stream=spec.fp_stream)
    return est.host_bytes


def choose(cfg, loaded=None, copies: int = 0, loaded_already: bool = False) -> str:
    """``none`` or ``disk`` for ``cfg.offload`` (``auto`` decided now); ``loaded``: a model already given."""
    if loaded is not None:
        streamed = is_streamed(loaded.model)
        if cfg.offload == DISK and not streamed:
            raise WorkbenchError("offload='disk' reads the model from its checkpoint; leave out loaded= (the "
                                 "model in memory), or run with offload='none'")
        return DISK if streamed else NONE
    if cfg.offload != AUTO:
        return cfg.offload
    if cfg.gguf_type is not None:     # written from the model in memory
        return NONE
    need = in_memory_bytes(cfg, copies, loaded_already)
    return DISK if need > HEADROOM * available_bytes(torch.device("cpu")) else NONE
