"""Memory: what a run used at its peak, and what the machine has free.

``ru_maxrss`` and ``torch.cuda.max_memory_allocated`` are process-wide high-water marks: in the app,
where several sessions run in one process, they report the largest run since the server started,
and resetting the CUDA one would reset it under every other run. A ``PeakMeter`` instead samples
the current figure while its run goes on, so a run reports the peak of its own time span.
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import torch

INTERVAL = 0.02     # seconds between samples: short steps (a forward of a block) are caught too


def rss_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):   # not Linux: the high-water mark is the best there is
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def used_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return rss_bytes()


def available_bytes(device: torch.device) -> int:
    """Memory a run could still take on ``device``: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PeakMeter:
    """The highest ``used_bytes(device)`` between ``start()`` and ``stop()`` (or now)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self.peak = used_bytes(device)
        self._stop = threading.Event()

    def start(self) -> "PeakMeter":
        # the sampler holds the meter weakly: a run that fails before ``stop`` does not leave it running
        t = threading.Thread(target=_sample, args=(weakref.ref(self), self._stop), name="workbench-memory",
                             daemon=True)
        t.start()
        return self

    def sample(self):
        self.peak = max(self.peak, used_bytes(self.device))

    def stop(self) -> int:
        self._stop.set()
        self.sample()
        return self.peak

    def __del__(self):
        self._stop.set()


def _sample(ref, stop: threading.Event):
    while not stop.wait(INTERVAL):
        meter = ref()
        if meter is None:
            return
        meter.sample()
        del meter


# -- what a run will need --------------------------------------------------------------------------

GiB = 2 ** 30
HEADROOM = 0.9      # of the free memory a run may plan to take: the rest is for what the estimate misses


@dataclass
class Estimate:
    """Peak bytes of a run by part, on the host and on the device (the same when it runs on the CPU)."""
    host: dict
    device: dict
    on_cuda: bool

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())


def estimate(cfg, model, copies: int = 1, attention_aware: bool = False, fp_stream: bool = False,
             on_cuda: bool = False, streamed: bool = False) -> Estimate:
    """The peak memory a run with ``cfg`` adds to what is in memory now, from the settings and the model.

    ``copies``: working copies of the model the run makes (the workspace quantizes a copy of the
    cached model: 1; the API quantizes the model it loaded: 0). The largest terms are the block
    inputs kept for every calibration window (twice with the full-precision stream), the attention
    probabilities ``[batch, heads, L, L]`` and, for BoA's statistics, per-position moments
    ``[kv heads, L, d, d]``, and the logits ``[batch, L, vocab]`` of the perplexity.

    ``streamed`` (``--offload disk``, ``model`` a ``StreamedModel``): no copy of the model, one block
    read at a time (two with the full-precision stream), the evaluation's hidden states held between
    blocks (up to ``--activation-memory``) and its logits made a slice at a time.
    """
    c = model.config
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = getattr(c, "hidden_size", None) or getattr(c, "d_model", 0)
    heads = getattr(c, "num_attention_heads", 1)
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // max(heads, 1)
    widest = max(hidden, getattr(c, "intermediate_size", 0) or getattr(c, "ffn_dim", 0) or 0)
    vocab = getattr(c, "vocab_size", 0)
    L, n, b = cfg.seqlen, cfg.calib_samples, min(cfg.batch_size, cfg.calib_samples)
    f32 = 4
    streams = 2 if fp_stream else 1
    limit = None if getattr(cfg, "activation_memory", None) is None else int(cfg.activation_memory * 10 ** 9)
    host = {"model copy": copies * params,
            # inputs and outputs of the current block for every window, kept on the CPU
            "block inputs": 2 * streams * n * L * hidden * f32}
    f64 = 8     # the statistics are float64 sums (see ``hessians``), read back in float32
    work = {"statistics": 2 * widest * widest * (f64 + f32)
            + (2 * kv * L * head_dim * head_dim * (f64 + f32) if attention_aware else 0)}
    # the attention of a block's forward and the perplexity's logits come one after the other: the larger counts
    transient = {"attention": 2 * b * heads * L * L * f32}
    if cfg.eval_windows >= 0:
        transient["perplexity logits"] = 3 * cfg.batch_size * L * vocab * f32
    blocks = {}
    if streamed:
        from .evaluate_streamed import LOGIT_BUDGET
        host["model copy"] = 0
        blocks["blocks read"] = streams * model.block_bytes()
        if cfg.eval_windows >= 0:
            transient["perplexity logits"] = 3 * min(cfg.batch_size * L * vocab * f32, LOGIT_BUDGET)
        if cfg.eval_windows > 0:    # (all windows, 0: as many as the text holds, bounded by the limit only)
            held = 2 * cfg.eval_windows * L * hidden * f32
            host["evaluation hidden states"] = held if limit is None else min(held, limit)
    largest = max(transient, key=transient.get)
    work[largest] = transient[largest]
    if not on_cuda:
        return Estimate({**host, **blocks, **work}, {}, False)
    # on a GPU: the in-memory perplexity takes the whole model there, quantizing only one block at a time
    return Estimate(host, {**(blocks if streamed else {"model": params}), **work}, True)


class Phases:
    """Per phase of a run (``with phases("quantize"):``): the resident-set peak the OS reports, and the
    peaks of the model weights and the activations the run holds (``record``, for the report)."""

    def __init__(self, weights, pool):
        self.weights, self.pool = weights, pool     # a ``Residency`` or a fixed byte count; an ActivationPool
        self.record: dict[str, dict] = {}

    def __call__(self, name: str):
        from contextlib import contextmanager

        @contextmanager
        def phase():
            meter = PeakMeter(torch.device("cpu")).start()
            if hasattr(self.weights, "reset_peak"):
                self.weights.reset_peak()
            self.pool.reset_peaks()
            try:
                yield
            finally:
                weights = self.weights.peak if hasattr(self.weights, "peak") else int(self.weights)
                self.record[name] = {"peak_rss_bytes": meter.stop(), "weights_bytes": weights,
                                     "activations_bytes": self.pool.peak_memory,
                                     "activations_on_disk_bytes": self.pool.peak_disk}
        return phase()


def _parts(parts: dict) -> str:
    big = sorted(((v, k) for k, v in parts.items() if v >= 0.05 * GiB), reverse=True)[:3]
    return ", ".join(f"{k} {v / GiB:.1f}" for v, k in big)


def check_fits(est: Estimate, device: torch.device, fix: str):
    """``WorkbenchError`` with the estimate and the free memory when the run would not fit."""
    from .errors import WorkbenchError
    checks = [("memory", est.host_bytes, available_bytes(torch.device("cpu")), est.host)]
    if est.on_cuda:
        checks.append((f"{device} memory", est.device_bytes, available_bytes(device), est.device))
    for where, need, free, parts in checks:
        if need > HEADROOM * free:
            raise WorkbenchError(f"this run needs about {need / GiB:.1f} GiB of {where} at its peak ({_parts(parts)} "
                                 f"GiB) but {free / GiB:.1f} GiB is free; {fix}")
