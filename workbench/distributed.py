"""Data-parallel calibration on ``torch.distributed`` (``torchrun --nproc-per-node N -m workbench ...``).

Every rank streams its share of the calibration windows through the block; the running sums of
the statistics are all-reduced before each solve, so every rank holds the statistics of all the
windows. Each layer is then solved once, on the rank a balanced assignment gives it, and its
codes and grid are broadcast; every rank puts them in and propagates its own windows through
the quantized block. ``gloo`` on CPUs, ``nccl`` on GPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import WorkbenchError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """The rank that reports, prints and writes files."""
        return self.rank == 0

    def share(self, ids: torch.Tensor, chunk: int = 1) -> torch.Tensor:
        """This rank's windows: every ``world``-th run of ``chunk``, from its own offset.

        With ``chunk`` the batch size, each rank's batches are batches of the one-process run, row for
        row, so their products (and, summed in float64, the statistics) come out the same bits."""
        starts = range(self.rank * chunk, ids.shape[0], self.world * chunk)
        return torch.cat([ids[s:s + chunk] for s in starts]) if len(starts) else ids[:0]

    def sum_(self, *tensors: torch.Tensor | None) -> None:
        """In-place sums over the ranks (None entries skipped)."""
        if not self.active:
            return
        import torch.distributed as dist
        for t in tensors:
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def sum_numbers(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device_of_collectives())
        self.sum_(t)
        return t.tolist()

    def device_of_collectives(self) -> torch.device:
        import torch.distributed as dist
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def broadcast(self, obj, src: int):
        """``obj`` from rank ``src`` on every rank (pickled between the run's own processes)."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def assign(self, costs: list[float]) -> list[int]:
        """The rank that solves each job: the costliest first, each to the least loaded rank."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner


SINGLE = Ranks()


def from_environment() -> Ranks:
    """The ranks ``torchrun`` set up (``WORLD_SIZE`` > 1), with the process group started; else one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist
    if not dist.is_available():
        raise WorkbenchError("WORLD_SIZE is set but this torch has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size())
