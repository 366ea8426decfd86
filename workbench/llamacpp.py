"""llama.cpp (through ``llama-cpp-python``) on a GGUF file: logits and perplexity on the same token
windows as the workbench's own evaluation, so the two numbers compare directly."""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import Cancelled, WorkbenchError

INSTALL_HINT = "pip install 'quant-workbench[llamacpp]' (compiles llama.cpp: about 5-15 minutes on 2 cores)"


def require_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise WorkbenchError(f"running GGUF files in llama.cpp needs llama-cpp-python: {INSTALL_HINT}") from None


@contextmanager
def llama(path: str | os.PathLike, n_ctx: int, threads: int | None = None):
    """A llama.cpp context on ``path`` that keeps the logits of every position."""
    require_llama_cpp()
    from llama_cpp import Llama

    from .export_gguf import find_gguf
    file = find_gguf(Path(path).expanduser())
    with _plain_cpu_buffers():
        model = Llama(model_path=str(file), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                      n_threads=threads or os.cpu_count(), verbose=False)
    try:
        yield model
    finally:
        model.close()


_PARAMS_LOCK = threading.Lock()


@contextmanager
def _plain_cpu_buffers():
    """Load with ``use_extra_bufts`` off: llama.cpp's AMX weight buffers crash in the first product on
    CPUs with AMX (Sapphire Rapids: llama.cpp issue #20824), and ``Llama`` has no argument for it, so
    its default parameters are wrapped while one model loads. The plain CPU buffers compute the same
    quantized products (q8_0 activations against the file's blocks)."""
    import llama_cpp
    from llama_cpp import llama as llama_module
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    with _PARAMS_LOCK:
        llama_module.llama_cpp.llama_model_default_params = params
        try:
            yield
        finally:
            llama_module.llama_cpp.llama_model_default_params = default


def window_logits(model, ids: torch.Tensor) -> np.ndarray:
    """``[L, vocab]`` float32 logits of one window ``ids [L]``, from an empty cache."""
    model.reset()
    model.eval(ids.tolist())
    return np.array(model.scores[: ids.numel()], dtype=np.float32)


def logits(path, windows: torch.Tensor, threads: int | None = None) -> np.ndarray:
    """``[n, L, vocab]`` logits of each window of ``windows [n, L]``."""
    with llama(path, windows.shape[1], threads) as model:
        return np.stack([window_logits(model, w) for w in windows])


def next_token_nll(scores: np.ndarray, ids: torch.Tensor) -> float:
    """Summed next-token loss of one window from its logits ``[L, vocab]`` (float64 for the sum)."""
    s = scores[:-1].astype(np.float64)
    top = s.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(s - top).sum(-1, keepdims=True))).squeeze(-1)
    target = ids[1:].numpy()
    return float((lse - s[np.arange(len(target)), target]).sum())


def perplexity(path, windows: torch.Tensor, threads: int | None = None, progress=None, cancel=None) -> float:
    """exp of the mean next-token loss over ``windows [n, L]``, each scored on its own: the
    definition of ``workbench.evaluate.perplexity``."""
    total, count = 0.0, 0
    with llama(path, windows.shape[1], threads) as model:
        for i, w in enumerate(windows):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled during the llama.cpp evaluation")
            total += next_token_nll(window_logits(model, w), w)
            count += w.numel() - 1
            if progress is not None:
                progress(i + 1, windows.shape[0])
    return math.exp(total / count)


def quantize_file(source: str | os.PathLike, target: str | os.PathLike, file_type: str,
                  threads: int | None = None) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``, no importance matrix) from a float GGUF:
    the baseline the workbench's files are compared with. ``file_type``: ``gguf.LlamaFileType`` name."""
    require_llama_cpp()
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{file_type}")
    params.nthread = threads or os.cpu_count()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise WorkbenchError(f"llama.cpp could not quantize {source} to {file_type}")
