"""Two loops of the solvers compiled from C, for float32 tensors on the CPU.

``gptq_block``: GPTQ's column loop over one block. In eager mode every column costs about ten
tensor operations on a vector of one column's rows; on the CPU their dispatch, not their
arithmetic, set the solve time (a model's layers have some 150k columns). Here a block's columns
are one call: the rows are independent in the loop, so 16 at a time run through all the block's
columns as the lanes of one vector, in the L1 cache, with the float operations of the eager loop
in its order (the same numbers).

``mse_screen``: the MSE grid search's errors of every candidate range, approximately. The exact
search spends its time in ``pow`` (|error|^2.4 of each weight for 65 ranges); the screen's
polynomial power is several times cheaper, and the exact errors are then taken only for the
candidates the screen cannot rule out (``grid.mse_params``): the search picks what the eager
search picks.

The source is plain C called through ``ctypes`` (a call releases the GIL), built on x86-64 Linux
for AVX-512, AVX2 and plain x86-64, the variant picked when loaded: it compiles in about 2 s on two cores,
where a ``torch.utils.cpp_extension`` build of a one-line function takes 37 s. The library is
cached under the workbench's cache, keyed by its source, compiler and flags.
Without a C compiler, on other platforms, or with ``WORKBENCH_COMPILE=0``, the functions here
return ``None`` and their callers run in eager torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* a variant per vector width, picked when loaded (GCC's ifuncs: x86-64 Linux) */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define VARIANTS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VARIANTS
#endif

#define LANES 16                /* rows taken together, as the lanes of one vector */
#define GROUP 4                 /* columns whose errors go off the later columns together */
#define MAX_THREADS 64
typedef float lanes __attribute__((vector_size(LANES * sizeof(float)), may_alias));

/* ---- items first..last-1 of a job split over threads started for the call (none kept) ---- */

typedef void (*range_fn)(void *job, int64_t first, int64_t last);
typedef struct { range_fn fn; void *job; int64_t first, last; } part;

static void *run_part(void *p) {
    part *x = p;
    x->fn(x->job, x->first, x->last);
    return NULL;
}

static void in_parallel(range_fn fn, void *job, int64_t items, int threads) {
    threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    threads = items < threads ? (int)(items > 0 ? items : 1) : threads;
    part parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++)
        parts[t] = (part){fn, job, items * t / threads, items * (t + 1) / threads};
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_part, &parts[t]) == 0;
    for (int t = 0; t < threads; t++)      /* a part whose thread did not start runs here */
        if (t == 0 || !started[t])
            run_part(&parts[t]);
    for (int t = 1; t < threads; t++)
        if (started[t])
            pthread_join(ids[t], NULL);
}

/* ---- GPTQ's column loop over a block ---- */

typedef struct { float *p; int64_t batch, row; } view;   /* a [B, R, n] tensor with contiguous rows */

#define AT(v, b, r, i) ((v).p[(b) * (v).batch + (r) * (v).row + (i)])

/* The grid's fake quantization of one weight, in the order of grid.py's ops (and so with its
   rounding): zero point s (clamp(round(w / s) + z) - z), or minimum s clamp(round((w + z) / s)) - z. */
static inline __attribute__((always_inline)) float on_grid(float w, float s, float z, float maxq, int min_offset) {
    float t = min_offset ? rintf((w + z) / s) : rintf(w / s) + z;
    t = t < 0.0f ? 0.0f : (t > maxq ? maxq : t);
    return min_offset ? s * t - z : s * (t - z);
}

typedef struct {
    view W, S, Z, Q, E;
    const float *U;
    int64_t ub, ui, R, n, start, stop;
    float maxq;
    int min_offset, failed;
} block_job;

/* Tiles first..last-1 (tile = batch x 16 rows): the rows transposed into T, so that taking a
   column's error off a later column is one vector operation. */
VARIANTS
void block_tiles(void *job, int64_t first, int64_t last) {
    block_job *x = job;
    int64_t n = x->n, tiles = (x->R + LANES - 1) / LANES;
    lanes *T = aligned_alloc(sizeof(lanes), sizeof(lanes) * n);
    if (!T) {
        __atomic_store_n(&x->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t tile = first; tile < last; tile++) {
        int64_t b = tile / tiles, r0 = tile % tiles * LANES;
        int m = x->R - r0 < LANES ? (int)(x->R - r0) : LANES;
        const float *Ub = x->U + b * x->ub;
        /* lanes past the last row stay at 0 on a grid of scale 1: their errors are 0 */
        for (int64_t j = x->start; j < n; j++) {
            float *t = (float *)&T[j];
            for (int k = 0; k < LANES; k++)
                t[k] = k < m ? AT(x->W, b, r0 + k, j) : 0.0f;
        }
        for (int64_t i0 = x->start; i0 < x->stop; i0 += GROUP) {
            int64_t i1 = x->stop - i0 < GROUP ? x->stop : i0 + GROUP;
            lanes ev[GROUP];
            for (int64_t i = i0; i < i1; i++) {
                float s[LANES], z[LANES], q[LANES], e[LANES], d = Ub[i * x->ui + i];
                const float *w = (const float *)&T[i];
                for (int k = 0; k < LANES; k++) {
                    s[k] = k < m ? AT(x->S, b, r0 + k, i) : 1.0f;
                    z[k] = k < m ? AT(x->Z, b, r0 + k, i) : 0.0f;
                }
                if (x->min_offset)     /* the form a constant of each loop: one division per weight */
                    for (int k = 0; k < LANES; k++)
                        q[k] = on_grid(w[k], s[k], z[k], x->maxq, 1);
                else
                    for (int k = 0; k < LANES; k++)
                        q[k] = on_grid(w[k], s[k], z[k], x->maxq, 0);
                for (int k = 0; k < LANES; k++)
                    e[k] = (w[k] - q[k]) / d;
                for (int k = 0; k < m; k++) {
                    AT(x->Q, b, r0 + k, i) = q[k];
                    AT(x->E, b, r0 + k, i) = e[k];
                }
                const float *u = Ub + i * x->ui;
                ev[i - i0] = *(const lanes *)e;
                for (int64_t j = i + 1; j < i1; j++)
                    T[j] -= ev[i - i0] * u[j];
            }
            /* the group's errors off each later column in a register, in the order of the columns:
               the same roundings as one column at a time, a quarter of the loads and stores */
            int g = (int)(i1 - i0);
            const float *u0 = Ub + i0 * x->ui;
            for (int64_t j = i1; j < n; j++) {
                lanes t = T[j];
                for (int k = 0; k < g; k++)
                    t -= ev[k] * u0[k * x->ui + j];
                T[j] = t;
            }
        }
        /* the columns left for later segments, as the loop has updated them */
        for (int k = 0; k < m; k++)
            for (int64_t j = x->stop; j < n; j++)
                AT(x->W, b, r0 + k, j) = ((const float *)&T[j])[k];
    }
    free(T);
}

/* Columns start..stop-1 of a block of n columns: each column's weights are put on their grid
   (into Q), the error divided by U's diagonal is kept (in E) and taken off the block's later
   columns of W. U is [B, n, n] with strides ub, ui and contiguous rows. Returns 0, or -1 when
   out of memory. */
int gptq_block(view W, view S, view Z, view Q, view E, const float *U, int64_t ub, int64_t ui,
               int64_t B, int64_t R, int64_t n, int64_t start, int64_t stop, float maxq, int min_offset,
               int threads) {
    block_job job = {W, S, Z, Q, E, U, ub, ui, R, n, start, stop, maxq, min_offset, 0};
    in_parallel(block_tiles, &job, B * ((R + LANES - 1) / LANES), threads);
    return job.failed ? -1 : 0;
}

/* ---- the MSE grid search's screen ---- */

/* x^p for x >= 0 as exp2(p log2 x), from polynomials (fitted at Chebyshev nodes): within 2e-5
   relative where the result is a normal float; 0 for x = 0 and for results below 2^-126. */
static inline __attribute__((always_inline)) float approx_pow(float x, float p) {
    int tiny = x < 1.17549435e-38f;                       /* subnormal: scaled up first */
    float xs = tiny ? x * 16777216.0f : x;
    uint32_t bits;
    memcpy(&bits, &xs, sizeof bits);
    int32_t ex = (int32_t)(bits >> 23) - 127 - (tiny ? 24 : 0);
    uint32_t mb = (bits & 0x7fffffu) | 0x3f800000u;
    float m;
    memcpy(&m, &mb, sizeof m);
    int high = m > 1.41421356f;                           /* mantissa into [sqrt(1/2), sqrt(2)) */
    m = high ? 0.5f * m : m;
    ex += high;
    float u = m - 1.0f;                                   /* log2(1 + u): 4e-6 absolute */
    float l = u * (1.44270182f + u * (-0.721208453f + u * (0.479793876f + u * (-0.366413265f
              + u * (0.318407118f + u * -0.206858128f)))));
    float y = p * ((float)ex + l);
    y = y < -127.0f ? -127.0f : (y > 128.0f ? 128.0f : y);
    float nr = rintf(y), f = y - nr;                      /* 2^f on [-1/2, 1/2]: 1e-7 relative */
    float e = 1.00000012f + f * (0.693147182f + f * (0.240221068f + f * (0.0555032715f
              + f * (0.00967603736f + f * 0.00134004327f))));
    int32_t ni = (int32_t)nr;
    uint32_t pb = (uint32_t)(ni + 127) << 23;
    float two;
    memcpy(&two, &pb, sizeof two);
    float r = ni < -126 ? 0.0f : (ni > 127 ? INFINITY : e * two);
    return x > 0.0f ? r : 0.0f;
}

typedef struct {
    const float *w, *lo, *hi, *shrink;
    int64_t n, K;
    float maxq, p, margin, floor_;
    int symmetric, min_offset, failed;
    float *out;
} screen_job;

/* One row's screened errors, for a grid form known when compiling; returns its least candidate.
   scale, zero and ends have room for the K candidates. */
static inline __attribute__((always_inline)) int64_t screen_row(const screen_job *x, int64_t r, int64_t first,
                                                              const int min_offset, float *scale, float *zero,
                                                              float *ends) {
    const float *row = x->w + r * x->n;
    float *out = x->out + r * x->K, best = INFINITY, maxq = x->maxq, lo = x->lo[r], hi = x->hi[r];
    int64_t best_c = first, n = x->n, K = x->K;
    /* every candidate's grid, by range_params' ops, and the errors of the row's two extremes: a
       bound from below that rules out most ranges (those that clip far) before any other weight */
    for (int64_t c = 0; c < K; c++) {
        float l = lo * x->shrink[c], h = hi * x->shrink[c];
        l = l > 0.0f ? 0.0f : l;
        h = h < 0.0f ? 0.0f : h;
        float a = fabsf(l) > h ? fabsf(l) : h;
        h = x->symmetric ? a : h;
        l = x->symmetric ? -a : l;
        float span = h - l, s = span > 0.0f ? span / maxq : 1.0f;
        float z = x->symmetric ? (maxq + 1.0f) / 2.0f : (min_offset ? -l : rintf(-l / s));
        float e_hi = approx_pow(fabsf(on_grid(hi, s, z, maxq, min_offset) - hi), x->p);
        float e_lo = approx_pow(fabsf(on_grid(lo, s, z, maxq, min_offset) - lo), x->p);
        scale[c] = s;
        zero[c] = z;
        ends[c] = lo < hi ? e_hi + e_lo : e_hi;
    }
    for (int64_t v = 0; v < K; v++) {
        int64_t c = v == 0 ? first : (v <= first ? v - 1 : v);
        float bound = best * x->margin + x->floor_, sum = ends[c];
        if (sum <= bound) {
            float acc[LANES] = {0}, s = scale[c], z = zero[c];
            for (int64_t k0 = 0; k0 < n; k0 += LANES) {
                for (int j = 0; j < LANES; j++) {
                    float w = k0 + j < n ? row[k0 + j] : 0.0f;
                    float term = approx_pow(fabsf(on_grid(w, s, z, maxq, min_offset) - w), x->p);
                    acc[j] += k0 + j < n ? term : 0.0f;
                }
                sum = 0.0f;
                for (int j = 0; j < LANES; j++)
                    sum += acc[j];
                if (sum > bound)        /* already out of the running: the partial sum is kept */
                    break;
            }
        }
        out[c] = sum;
        if (sum < best) {
            best = sum;
            best_c = c;
        }
    }
    return best_c;
}

/* Rows first..last-1; each row starts with the candidate the row before found least. */
VARIANTS
void screen_rows(void *job, int64_t first, int64_t last) {
    screen_job *x = job;
    float *room = malloc(3 * sizeof(float) * x->K);
    if (!room) {
        __atomic_store_n(&x->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *scale = room, *zero = room + x->K, *ends = room + 2 * x->K;
    int64_t start = 0;
    for (int64_t r = first; r < last; r++)
        start = x->min_offset ? screen_row(x, r, start, 1, scale, zero, ends)
                              : screen_row(x, r, start, 0, scale, zero, ends);
    free(room);
}

/* Approximate sum over each of N rows of n weights w of |q(w) - w|^p, for each of K candidate
   ranges shrink[c] x [lo, hi] of the row (range_params' ops: the same grid, the same q(w)), into
   out [N, K]. A candidate whose partial sum passes margin x (the least full sum so far) + floor_
   is left there: it cannot be the least. */
int mse_screen(const float *w, int64_t N, int64_t n, const float *lo, const float *hi, const float *shrink,
               int64_t K, float maxq, int symmetric, int min_offset, float p, float margin, float floor_,
               float *out, int threads) {
    screen_job job = {w, lo, hi, shrink, n, K, maxq, p, margin, floor_, symmetric, min_offset, 0, out};
    in_parallel(screen_rows, &job, N, threads);
    return job.failed ? -1 : 0;
}
"""

# no contraction into fused multiply-adds: the grid's ops round as they do in torch
FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


class _View(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("batch", ctypes.c_int64), ("row", ctypes.c_int64)]


_SIGNATURES = {
    "gptq_block": ([_View] * 5 + [ctypes.c_void_p] + [ctypes.c_int64] * 7
                   + [ctypes.c_float, ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "mse_screen": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3
                   + [ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int] + [ctypes.c_float] * 3
                   + [ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
}

_STATE: dict = {}


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C loops can take ``tensors`` (float32 on the CPU, with contiguous rows); the
    library is compiled, or loaded from the cache, on the first call of the process that says yes."""
    if os.environ.get("WORKBENCH_COMPILE", "1") == "0" or not all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors):
        return False
    if "library" not in _STATE:
        _STATE["library"] = _load()
    return _STATE["library"] is not None


def block_columns(*tensors: torch.Tensor):
    """``gptq_block`` where it can take ``tensors``, else ``None`` (the solver's eager loop runs)."""
    return gptq_block if usable(*tensors) else None


def gptq_block(W1, s1, z1, Q1, err, U1, start: int, stop: int, grid):
    """Columns ``start:stop`` of the block ``W1 [B, R, n]`` on ``grid`` (see the C source for the roles)."""
    B, R, n = W1.shape
    views = []
    for t in (W1, s1, z1, Q1, err):
        if t.shape != W1.shape or t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError("the block's tensors must be float32 [B, R, n] with contiguous rows")
        views.append(_View(t.data_ptr(), t.stride(0), t.stride(1)))
    if U1.shape != (B, n, n) or U1.dtype != torch.float32 or U1.stride(-1) != 1:
        raise ValueError("the block's U must be float32 [B, n, n] with contiguous rows")
    work = B * R * (n - start) * (stop - start)
    if _STATE["library"].gptq_block(*views, U1.data_ptr(), U1.stride(0), U1.stride(1), B, R, n, start, stop,
                                    float(grid.maxq), int(grid.min_offset), _threads(work)):
        raise MemoryError("no memory for the column loop's tile")


def mse_screen(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, shrinks: torch.Tensor, maxq: int,
               symmetric: bool, min_offset: bool, norm: float, margin: float, floor: float) -> torch.Tensor | None:
    """Screened ``range_error`` of rows ``w [N, n]`` for each range ``shrinks[c] x [lo, hi]``
    (``lo``/``hi`` ``[N]``): ``[N, len(shrinks)]``. Each is within 2e-5 (relative, plus 1e-38 per
    weight) of the exact error, or, for a candidate already more than ``margin`` x a row's least
    + ``floor``, a partial sum that is so too. ``None`` where the C loops cannot run."""
    if not usable(w, lo, hi, shrinks):
        return None
    w, lo, hi, shrinks = (t.contiguous() for t in (w, lo, hi, shrinks))
    N, n = w.shape
    out = torch.empty(N, shrinks.numel(), dtype=torch.float32)
    if _STATE["library"].mse_screen(w.data_ptr(), N, n, lo.data_ptr(), hi.data_ptr(), shrinks.data_ptr(),
                                    shrinks.numel(), float(maxq), int(symmetric), int(min_offset), float(norm),
                                    float(margin), float(floor), out.data_ptr(), _threads(N * n * shrinks.numel())):
        raise MemoryError("no memory for the MSE screen's candidates")
    return out


# threads are started per call (none kept across a fork); under this many multiply-adds a second
# thread costs more than it saves
PARALLEL_WORK = 1 << 20


def _threads(work: int) -> int:
    return torch.get_num_threads() if work >= PARALLEL_WORK else 1


def compile_seconds() -> float | None:
    """Seconds this process spent compiling or loading the library (None if it never loaded)."""
    return _STATE.get("seconds")


def _load():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or sys.platform == "win32":
        return None
    key = hashlib.sha256("\0".join([SOURCE, compiler, *FLAGS]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"solver_loops-{key}.so"
    t0 = time.perf_counter()
    try:
        if not path.exists():
            _build(compiler, path)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        warnings.warn(f"the solver's C loops could not be compiled ({detail}); they run in eager torch",
                      RuntimeWarning, stacklevel=4)
        return None
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(library, name)
        fn.argtypes, fn.restype = args, result
    _STATE["seconds"] = time.perf_counter() - t0
    return library


def _build(compiler: str, path: Path):
    """Compile next to ``path`` and move into place: processes building at once all end with one whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, out = Path(tmp) / "solver_loops.c", Path(tmp) / path.name
        src.write_text(SOURCE)
        subprocess.run([compiler, *FLAGS, "-o", str(out), str(src)], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(out, path)


def _cache_dir() -> Path:
    from ..models.loading import cache_root
    return cache_root() / "kernels"
