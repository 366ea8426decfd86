"""Statistics and solve time of one layer against its size, beside the machine's matmul rate.

    python benchmarks/scaling.py                                   # d 512..4096, 4k/16k/64k tokens
    python benchmarks/scaling.py --sizes 512,1024 --tokens 4096    # a quick look

For a layer with d_in = d_out = d on synthetic data:

* statistics: ``H = 2/n X X^T`` accumulated as the engine does (``InputCovariance``, batches of
  2048 tokens), for each token count; its GFLOP/s count the 2/3 of the 2 d^2 n flops of X X^T that
  ``add_gram`` computes (the diagonal and upper blocks);
* solve: GPTQ (W4 g64, the method's MSE grids and act-order) and TurboBoA (its defaults, the
  output factor per head of 64 as q/k/v get it, the inherited-error correction included). Their
  dense arithmetic, counted for the GFLOP/s: the column updates d^3 (a multiply and a subtract
  for each later column of each column), the factorization 4/3 d^3, the loss 2 d^3; TurboBoA also
  the correction 13/3 d^3 and the scale refinement 2 d^3 (the grid search is not counted: it is
  no matmul);
* old against new in the same process, for GPTQ: the column loop of tensor operations (eager,
  what ran before the C loop) and the C loop; the sequential MSE search and the screened one;
* the value Hessian of one KV head group, ``sum_h X^T A_h^T A_h X``, in the forms it could take,
  for one batch of the embedded model's attention (4 x 512 tokens, 9 query / 3 KV heads, d 576):
  milliseconds and the largest error against a float64 reference, relative to the largest entry.

Times are the least of ``--repeat`` runs after one untimed run; the exponent is the least-squares
slope of log time against log d.
"""
from __future__ import annotations

import argparse
import math
import time
from functools import partial

import torch

from workbench.attention_hessians import probs_gram
from workbench.hessians import InputCovariance, add_gram, add_upper_product, symmetric_from_upper
from workbench.methods import method_spec
from workbench.quant import grid as grid_module
from workbench.quant import native
from workbench.quant.grid import GridConfig, expand_groups, group_params
from workbench.quant.solver import gptq_columns, solve, stable_factor

HEAD = 64
BATCH_TOKENS = 2048
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def least_seconds(fn, repeat: int, clock) -> float:
    """The least of ``repeat`` timed runs, after one untimed run."""
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def matmul_gflops(timed, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b) / 1e9


def activation_batches(d: int, count: int = 4) -> list[torch.Tensor]:
    """Batches of inputs with a few strong channels, as a transformer's are; the statistics cycle
    through them (their cost does not depend on the values, and drawing them would be timed too)."""
    g = torch.Generator().manual_seed(d)
    gain = torch.ones(d)
    gain[: max(1, d // 64)] = 8.0
    return [torch.randn(BATCH_TOKENS, d, generator=g) * gain for _ in range(count)]


def statistics(batches: list[torch.Tensor], tokens: int) -> InputCovariance:
    cov = InputCovariance(batches[0].shape[-1], "cpu")
    for i, start in enumerate(range(0, tokens, BATCH_TOKENS)):
        cov.add(batches[i % len(batches)][: tokens - start])
    cov.H
    return cov


def layer(d: int):
    g = torch.Generator().manual_seed(d + 1)
    W = torch.randn(d, d, generator=g) * 0.02
    keys = torch.randn(d // HEAD, HEAD, 4 * HEAD, generator=g)
    H_out = keys @ keys.transpose(1, 2) / (4 * HEAD)
    cross = torch.randn(d, d, generator=g) * 1e-3
    return W, H_out, cross


def solve_arithmetic(method: str, d: int) -> float:
    gptq = d ** 3 + 4 / 3 * d ** 3 + 2 * d ** 3
    return gptq if method == "gptq" else gptq + 13 / 3 * d ** 3 + 2 * d ** 3


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log seconds against log size."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den > 0 else float("nan")


def old_and_new(W: torch.Tensor, H: torch.Tensor, grid: GridConfig, timed) -> dict:
    """GPTQ's column loop and MSE search, each the way it ran before and the way it runs now."""
    C = W.shape[-1]
    W3 = W.unsqueeze(0)
    factor = stable_factor(H.unsqueeze(0), 0.01, act_order=True)
    s, z = group_params(W3, grid)
    scale, zero = expand_groups(s, C), expand_groups(z, C)
    unit = grid.grid_unit(C)

    def loop(eager):
        return lambda: gptq_columns(W3, factor.U, scale, zero, grid, unit, False, 128, eager=eager)

    def sequential():
        screen, grid_module.mse_screen = grid_module.mse_screen, lambda *args: None
        try:
            group_params(W3, grid)
        finally:
            grid_module.mse_screen = screen

    return {"loop eager": timed(loop(True)), "loop C": timed(loop(False)), "grid sequential": timed(sequential),
            "grid screened": timed(lambda: group_params(W3, grid))}


def causal_apply(A: torch.Tensor, x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``A @ x`` for causal ``A [b, h, L, L]``: a chunk of query rows reads the keys up to its last row
    (the form the value Hessian took before ``probs_gram``)."""
    b, h, L, _ = A.shape
    step = -(-L // chunks)
    return torch.cat([(A[:, :, i0:i0 + step, :i0 + step].reshape(b, -1, min(L, i0 + step)) @ x[:, :i0 + step])
                      .reshape(b, h, -1, x.shape[-1]) for i0 in range(0, L, step)], dim=2)


def value_hessian_forms(timed, b: int = 4, L: int = 512, heads: int = 9, kv: int = 3, d: int = 576) -> list:
    """``(form, ms, relative error)`` per way of computing the value Hessians of one batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, L, d, generator=g)
    logits = torch.randn(b, heads, L, L, generator=g).masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
    A = torch.softmax(logits, -1)
    group = heads // kv
    ref = torch.einsum("bhts,bsd->bhtd", A.double(), x.double())
    ref = torch.einsum("bgtd,bgte->gde", ref.reshape(b, kv, group * L, d), ref.reshape(b, kv, group * L, d))

    def through_probs_gram(chunks: int):     # the engine's: X^T (sum_h A_h^T A_h) X
        def run():
            acc = torch.zeros(kv, d, d, dtype=torch.float64)
            Z = (probs_gram(A, group, chunks) @ x.unsqueeze(1)).transpose(0, 1).reshape(kv, b * L, d)
            add_upper_product(acc, x.reshape(b * L, d), Z)
            return symmetric_from_upper(acc)
        return run

    def gram_of(Y, dtype=torch.float32):
        acc = torch.zeros(kv, d, d, dtype=torch.float64)
        for y in Y.to(dtype).view(b, kv, group * L, d):
            add_gram(acc, y)
        return symmetric_from_upper(acc)

    def einsum():
        Y = torch.einsum("bhts,bsd->bhtd", A, x).reshape(b, kv, group * L, d)
        return torch.einsum("bgtd,bgte->gde", Y, Y).double()

    def baddbmm():
        Y = (A @ x.unsqueeze(1)).reshape(b * kv, group * L, d)
        acc = torch.zeros(kv, d, d)
        for i in range(b):
            acc.baddbmm_(Y[i * kv:(i + 1) * kv].transpose(1, 2), Y[i * kv:(i + 1) * kv])
        return acc.double()

    A16, x16 = A.bfloat16(), x.bfloat16()
    forms = {"X^T (sum_h A_h^T A_h) X, 8 causal chunks (the engine's)": through_probs_gram(8),
             "the same, 4 chunks": through_probs_gram(4),
             "the same, 16 chunks": through_probs_gram(16),
             "heads' inputs A_h X in 8 causal chunks, upper-block Gram (before)": lambda: gram_of(causal_apply(A, x, 8)),
             "heads' inputs as one full product, upper-block Gram": lambda: gram_of(A @ x.unsqueeze(1)),
             "einsum for both products": einsum,
             "baddbmm_ into a float32 sum": baddbmm,
             "bfloat16 products (heads' inputs, Gram), float64 sum": lambda: gram_of(causal_apply(A16, x16, 8),
                                                                                    torch.bfloat16)}
    rows = []
    for name, fn in forms.items():
        err = float((fn() - ref).abs().max() / ref.abs().max())
        rows.append((name, 1e3 * timed(fn), err))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024,2048,4096", help="d_in = d_out of the layer (comma-separated)")
    p.add_argument("--tokens", default="4096,16384,65536", help="calibration tokens (comma-separated)")
    p.add_argument("--methods", default="gptq,turboboa")
    p.add_argument("--repeat", type=int, default=3, help="runs per timing; the least is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-value-forms", action="store_true", help="leave out the value Hessian's forms")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS),
                   help="cpu: this process's CPU time, steadier than wall time on a shared machine (with --threads 1)")
    args = p.parse_args(argv)
    timed = partial(least_seconds, repeat=args.repeat, clock=CLOCKS[args.clock])
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    methods = args.methods.split(",")
    peak = matmul_gflops(timed)
    loops = (f"compiled or loaded in {native.compile_seconds():.2f} s" if native.usable(torch.zeros(1))
             else "not available: eager tensor operations only")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; float32 matmul "
          f"(2048^3): {peak:.1f} GFLOP/s; the solver's C loops {loops}\n")

    print("| d | tokens | statistics s | GFLOP/s |")
    print("| --- | --- | --- | --- |")
    stats_s = {t: [] for t in token_counts}
    H = {}
    for d in sizes:
        batches = activation_batches(d)
        H[d] = statistics(batches, token_counts[0]).H
        for tokens in token_counts:
            secs = timed(lambda: statistics(batches, tokens))
            stats_s[tokens].append(secs)
            print(f"| {d} | {tokens} | {secs:.3f} | {d * d * tokens * 2 * 2 / 3 / secs / 1e9:.1f} |", flush=True)

    print("\n| method | d | solve s | GFLOP/s | of matmul |")
    print("| --- | --- | --- | --- | --- |")
    solve_s = {m: [] for m in methods}
    for method in methods:
        spec = method_spec(method)
        grid = GridConfig(bits=4, group_size=64, search=spec.grid_search)
        for d in sizes:
            W, H_out, cross = layer(d)
            attention = spec.attention_aware
            run = (lambda: solve(W, H[d], grid, spec.solver, H_out=H_out, cross=cross)) if attention else \
                (lambda: solve(W, H[d], grid, spec.solver))
            secs = timed(run)
            solve_s[method].append(secs)
            rate = solve_arithmetic(method, d) / secs / 1e9
            print(f"| {method} | {d} | {secs:.3f} | {rate:.1f} | {100 * rate / peak:.0f}% |", flush=True)

    print("\nGPTQ's pieces, as they ran before and as they run now (same process):\n")
    print("| d | loop eager s | loop C s | ratio | MSE search sequential s | screened s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    grid = GridConfig(bits=4, group_size=64, search="mse")
    for d in sizes:
        r = old_and_new(layer(d)[0], H[d], grid, timed)
        print(f"| {d} | {r['loop eager']:.3f} | {r['loop C']:.3f} | {r['loop eager'] / r['loop C']:.1f}x | "
              f"{r['grid sequential']:.3f} | {r['grid screened']:.3f} | "
              f"{r['grid sequential'] / r['grid screened']:.1f}x |", flush=True)

    if not args.skip_value_forms:
        print("\nThe value Hessian of one batch (4 x 512 tokens, 9 query / 3 KV heads, d 576):\n")
        print("| form | ms | max error / max entry |")
        print("| --- | --- | --- |")
        # at least 5 runs each: a form's first runs take the page faults of its buffers
        for name, ms, err in value_hessian_forms(partial(least_seconds, repeat=max(args.repeat, 5), clock=CLOCKS[args.clock])):
            print(f"| {name} | {ms:.1f} | {err:.1e} |", flush=True)

    if len(sizes) > 1:
        print("\nexponent of time against d:")
        for tokens in token_counts:
            print(f"  statistics, {tokens} tokens: {exponent(sizes, stats_s[tokens]):.2f}")
        for method in methods:
            print(f"  {method} solve: {exponent(sizes, solve_s[method]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
