"""One column-loop solver for GPTQ, BoA and TurboBoA.

The objective is the Kronecker-factored loss ``tr(H_out dW H_in dW^T)`` with ``dW = W_hat - W``
for each attention head (``H_out = I`` gives GPTQ's layer-wise loss). Weights are handled as
``[B, R, C]``: B independent problems (heads, or 1 for a whole layer), R output rows each,
C input columns. Rows are quantized ``rows_per_step`` at a time with GPTQ's column loop over
``H_in``; rows not yet quantized are then compensated in closed form through ``H_out``.
All B problems advance together as batched tensor operations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grid import GridConfig, expand_groups, grid_functions, group_params
from .lattice import lattice, place_scales
from .native import block_columns
from .weight import QuantizedWeight, from_codes


@dataclass(frozen=True)
class SolverConfig:
    damp: float = 0.01            # lambda in H += lambda * mean(diag H) * I
    block_size: int = 128         # lazy-update block of columns (rounded to whole groups)
    act_order: bool = False       # columns by descending diag(H_in), grids kept per original group
    rows_per_step: int = 1        # with H_out: 1 = BoA (row by row), N > 1 = TurboBoA joint rows
    grid_at_start: bool = False   # grids from the weights before any update (BoA); else when reached
    refine_iters: int = 0         # coordinate-descent sweeps over the row scales after rounding
    dx_alpha: float = 0.0         # strength of the correction for errors of earlier layers
    passes: int = 1               # column loops: each after the first re-solves the codes on the refined grids


@dataclass
class SolveResult:
    quantized: QuantizedWeight
    loss: float                                 # tr(H_out dW H_in dW^T) on the undamped statistics
    extra: dict = field(default_factory=dict)   # method-specific measures for the report

    @property
    def weight(self) -> torch.Tensor:
        """``[d_out, d_in]`` dequantized, on the grid."""
        return self.quantized.dequantize()

    @property
    def codes(self) -> torch.Tensor:
        return self.quantized.codes

    @property
    def scale(self) -> torch.Tensor:
        return self.quantized.scale

    @property
    def zero(self) -> torch.Tensor:
        return self.quantized.zero


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Copy of ``H`` ([..., n, n]) with dead inputs set to 1 and ``damp * mean(diag)`` added."""
    H = H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean(-1, keepdim=True)
    return H


class SolverError(ValueError):
    """A layer's statistics the solver cannot use; the engine names the layer and raises it to the user."""


DAMP_LIMIT = 1.0       # damping retried x10 up to this: beyond it H is mostly its diagonal, little better than RTN
DAMP_FLOOR = 1e-4      # the first retry of damp 0


def damping_steps(damp: float) -> list[float]:
    """The damping asked for, then x10 (from ``DAMP_FLOOR`` for 0) while it stays within ``DAMP_LIMIT``."""
    steps, d = [damp], max(damp, DAMP_FLOOR / 10) * 10
    while d <= DAMP_LIMIT * (1 + 1e-9):
        steps.append(min(d, DAMP_LIMIT))
        d *= 10
    if steps[-1] < DAMP_LIMIT:
        steps.append(DAMP_LIMIT)
    return steps


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, by two reductions (NaN and inf carry through max and min)
    rather than a mask the size of ``t``: a tenth of the time on a Hessian."""
    return t.numel() == 0 or bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin()))


def check_finite(t: torch.Tensor, what: str):
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise SolverError(f"{what} has {bad} entries that are not finite (NaN or inf)")


@dataclass(frozen=True)
class Factored:
    """A Hessian as the column loop takes it."""
    damp: float                       # the damping it needed
    H: torch.Tensor                   # damped, columns in their order
    perm: torch.Tensor | None         # the order the loop visits them ([B|1, n], act-order), or None
    U: torch.Tensor                   # ``inverse_cholesky_upper`` of H with its columns in that order


def stable_factor(H: torch.Tensor, damp: float, what: str = "the Hessian", act_order: bool = False) -> Factored:
    """``H`` with the least of ``damping_steps(damp)`` with which ``damped(H, .)`` factors (Cholesky
    of it and its inverse): one short calibration window or ``damp=0`` leaves H singular, and a
    retry beats a stop. The factor that tests it is the one the loop uses: it is made once."""
    check_finite(H, what)
    for d in damping_steps(damp):
        Hd = damped(H, d)
        # act-order: columns by descending diagonal, the ones the loss weighs most quantized first
        perm = torch.argsort(Hd.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True) if act_order else None
        try:
            U = inverse_cholesky_upper(Hd if perm is None else _permute_sym(Hd, perm))
        except torch.linalg.LinAlgError:
            continue
        if all_finite(U):
            return Factored(d, Hd, perm, U)
    raise SolverError(f"{what} is not positive definite even with damping {DAMP_LIMIT}; give more calibration "
                      f"samples or a longer --seqlen")


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``H^-1 = U^T U``; its row j is the Cholesky row of ``(H[j:, j:])^-1``.
    Row-major: the column loop reads U by rows.

    With ``J`` the reversal of rows and columns, ``J H J = L L^T`` gives ``U = J L^-1 J``: one
    Cholesky and one triangular solve. The textbook route (Cholesky, ``cholesky_inverse``, a
    second Cholesky) gives the same factor to float rounding, but ``cholesky_inverse`` took 0.4 s
    of a 1536-wide Hessian on 2 cores, half of GPTQ's solve time, against 0.15 s for all of this.
    """
    L = torch.linalg.cholesky(H.flip(-2, -1))
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(-2, -1).contiguous()


def kronecker_loss(dW: torch.Tensor, H_in: torch.Tensor, H_out: torch.Tensor | None) -> torch.Tensor:
    """``sum_b tr(H_out[b] dW[b] H_in[b] dW[b]^T)`` for ``dW [B, R, C]``."""
    left = dW if H_out is None else H_out @ dW
    return ((left @ H_in) * dW).sum()


def gptq_columns(W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 grid: GridConfig, group_width: int, dynamic: bool, block_size: int,
                 eager: bool = False, weight: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's column loop on ``W [B, R, C]`` with ``U [B|1, C, C]``; returns the quantized weights.

    ``scale``/``zero`` are per column ``[B, R, C]``; with ``dynamic`` a group's slices are filled
    (in place) from the current, already updated weights when its first column is reached
    (``group_width`` columns at once: a group, or a K-quant super-block of groups). A block's
    columns run in the C loop of ``native`` where it can; ``eager`` forces the loop of tensor
    operations, which any device runs. ``weight [B|1, 1, C]``: the columns' weights of a
    ``hessian`` grid search.
    """
    C = W.shape[-1]
    U = U.contiguous().expand(W.shape[0], C, C)               # the C loop reads U by rows
    W = W.clone(memory_format=torch.contiguous_format)
    Q = torch.empty_like(W)
    columns = (None if eager else block_columns(W, U, scale, zero)) or _block_columns_eager
    regrid = dynamic and group_width < C
    bs = max(group_width, block_size // group_width * group_width) if group_width < C else block_size
    for i1 in range(0, C, bs):
        i2 = min(i1 + bs, C)
        W1, s1, z1 = W[..., i1:i2], scale[..., i1:i2], zero[..., i1:i2]
        err = torch.empty_like(W1)
        # a block's segments start where a group's grid is taken from the weights as updated so far
        starts = list(range(0, i2 - i1, group_width)) if regrid else [0]
        for a, b in zip(starts, starts[1:] + [i2 - i1]):
            if regrid:
                cols = slice(i1 + a, i1 + a + group_width)
                s, z = group_params(W1[..., a:a + group_width], grid, None if weight is None else weight[..., cols])
                s1[..., a:a + group_width] = expand_groups(s, group_width)
                z1[..., a:a + group_width] = expand_groups(z, group_width)
            columns(W1, s1, z1, Q[..., i1:i2], err, U[:, i1:i2, i1:i2], a, b, grid)
        if i2 < C:
            W[..., i2:].baddbmm_(err, U[:, i1:i2, i2:], alpha=-1)
    return Q


def _block_columns_eager(W1, s1, z1, Q1, err, U1, start: int, stop: int, grid: GridConfig):
    """Columns ``start:stop`` of a block ``W1 [B, R, n]`` one by one: each put on its grid (into
    ``Q1``), its error over U's diagonal kept in ``err`` and taken off the block's later columns."""
    fake_quantize, n = grid_functions(grid)[0], W1.shape[-1]
    # per-column views taken at once: the loop is bound by per-call overhead on the small problems
    # of joint rows, so every indexing op saved there counts
    w_cols, q_cols, e_cols = W1.unbind(-1), Q1.unbind(-1), err.unbind(-1)
    s_cols, z_cols = s1.unbind(-1), z1.unbind(-1)
    diag = U1.diagonal(dim1=1, dim2=2).unsqueeze(1).unbind(-1)
    u_rows = U1.unsqueeze(2).unbind(1)
    for i in range(start, stop):
        w = w_cols[i]
        q_cols[i].copy_(fake_quantize(w, s_cols[i], z_cols[i], grid.maxq))
        e = torch.sub(w, q_cols[i], out=e_cols[i]).div_(diag[i])
        if i + 1 < n:
            W1[..., i + 1:].baddbmm_(e.unsqueeze(-1), u_rows[i][..., i + 1:], alpha=-1)


def row_compensation(U_out: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """``M`` with ``W_rest += M E_blk``: the exact minimiser of the Kronecker loss over rows ``r1:``
    once rows ``r0:r1`` are fixed with error ``E_blk = W_blk - W_hat_blk`` (rows before r0 fixed too).

    ``M = H[rest, rest]^-1 H[rest, blk] = -(U_bb^-1 U_b,rest)^T`` with ``U`` the upper Cholesky
    factor of ``H_out^-1``: GPTQ's column update, along rows and for a block at once.
    """
    M = torch.linalg.solve_triangular(U_out[:, r0:r1, r0:r1], U_out[:, r0:r1, r1:], upper=True)
    return -M.transpose(-1, -2)


def dx_corrected_target(W: torch.Tensor, H_in: torch.Tensor, cross: torch.Tensor, alpha: float) -> torch.Tensor:
    """Continuous optimum of ``||W X - W_hat X~||^2``: ``W (I + alpha dX X~^T H~^-1)``.

    ``cross`` is ``E[dX X~^T]`` with the same scaling as ``H_in = E[X~ X~^T]`` (damped), so the
    loss ``tr((W_hat - W*) H_in (W_hat - W*)^T)`` differs from the target's by a constant only:
    running the column loop on ``W*`` is the same as folding the correction into it.
    """
    L = torch.linalg.cholesky(H_in)
    correction = torch.cholesky_solve(cross.transpose(-1, -2), L).transpose(-1, -2)  # dX X~^T H~^-1
    return W + alpha * (W @ correction)


REFINE_ROWS = 8      # rows of a head whose coupling to the rest is taken in one product per refinement sweep


def refine_scales(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, W: torch.Tensor,
                  H_in: torch.Tensor, H_out: torch.Tensor | None, group_width: int, sweeps: int) -> torch.Tensor:
    """Exact coordinate descent on the row scales with the integer codes fixed.

    With ``W_hat_r = s_r (c_r - z_r)`` the Kronecker loss is quadratic in row r's group scales:
    ``h_rr * B_r H_in B_r^T s_r = B_r H_in (h_rr W_r - sum_{b != r} h_rb dW_b)^T``, where ``B_r``
    places the row's centred codes in its groups. Each step solves that system exactly, so the
    loss never increases; a row whose solution would flip a scale's sign keeps its scales.
    Without ``H_out`` rows are independent and one simultaneous step is exact.
    Shapes: codes/W ``[B, R, C]``, H_in ``[B, C, C]``, scale/zero ``[B, R, G]``.
    """
    B, R, C = W.shape
    G = scale.shape[-1]
    centred = codes - expand_groups(zero, C)
    # BH[b, r, g] = B_r H_in restricted to group g's rows: [B, R, G, C]; fixed since codes are
    BH = torch.einsum("brga,bgac->brgc", centred.reshape(B, R, G, group_width),
                      H_in.reshape(B, G, group_width, C))
    gram = (BH.reshape(B, R, G, G, group_width) * centred.reshape(B, R, 1, G, group_width)).sum(-1)
    empty = gram.diagonal(dim1=-2, dim2=-1) <= 0           # groups whose codes all sit on the zero point
    gram = gram + torch.diag_embed(empty.to(gram.dtype))

    def accept(old, new, empty):
        valid = ((new > 0) | empty).all(-1, keepdim=True)
        return torch.where(valid & ~empty, new, old)

    scale = scale.clone()
    if H_out is None:
        rhs = (BH * W.unsqueeze(2)).sum(-1)
        new = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
        return accept(scale, new, empty)
    dW = centred * expand_groups(scale, C) - W
    for _ in range(sweeps):
        for r0 in range(0, R, REFINE_ROWS):
            r1 = min(R, r0 + REFINE_ROWS)
            # sum_b h_rb dW_b for the block's rows in one product, then kept current row by row: a
            # product over the whole layer per row made the sweep memory-bound on large layers
            P = H_out[:, r0:r1] @ dW                                               # [B, r1 - r0, C]
            for r in range(r0, r1):
                h_rr = H_out[:, r, r].unsqueeze(-1)                                # [B, 1]
                target = h_rr * W[:, r] - (P[:, r - r0] - h_rr * dW[:, r])         # h_rr W_r - sum_{b != r} h_rb dW_b
                rhs = (BH[:, r] * target.unsqueeze(1)).sum(-1)                     # [B, G]
                new = torch.linalg.solve(h_rr.unsqueeze(-1) * gram[:, r], rhs.unsqueeze(-1)).squeeze(-1)
                scale[:, r] = accept(scale[:, r], new, empty[:, r])
                row = centred[:, r] * expand_groups(scale[:, r], C) - W[:, r]
                P.add_(H_out[:, r0:r1, r].unsqueeze(-1) * (row - dW[:, r]).unsqueeze(1))
                dW[:, r] = row
    return scale


def solve(W: torch.Tensor, H_in: torch.Tensor, grid: GridConfig, cfg: SolverConfig = SolverConfig(),
          H_out: torch.Tensor | None = None, cross: torch.Tensor | None = None,
          cross_H: torch.Tensor | None = None) -> SolveResult:
    """Quantize ``W [d_out, d_in]`` minimising ``tr(H_out dW H_in dW^T)`` head by head.

    ``H_in``: ``[d_in, d_in]`` shared, or ``[heads, d_in, d_in]`` one per head.
    ``H_out``: ``None`` (layer-wise, GPTQ) or ``[heads, d_head, d_head]``.
    ``cross``: ``E[dX X~^T]`` for the correction of inherited errors (``cfg.dx_alpha > 0``), with
    ``cross_H = E[X~ X~^T]`` when ``H_in`` is another moment (the value projection's per-head one).
    """
    d_out, C = W.shape
    heads = H_out.shape[0] if H_out is not None else (H_in.shape[0] if H_in.dim() == 3 else 1)
    Wf = W.detach().to(torch.float32).reshape(heads, d_out // heads, C).clone()
    Hi = H_in.to(torch.float32)
    Hi = Hi if Hi.dim() == 3 else Hi.unsqueeze(0)
    dead = Hi.diagonal(dim1=-2, dim2=-1) <= 0                               # [B|1, C]
    Wf = Wf.masked_fill(dead.unsqueeze(1), 0.0)
    check_finite(Wf, "the weight")
    f_in = stable_factor(Hi, cfg.damp, "the input Hessian", cfg.act_order)
    extra = {"damp": f_in.damp}
    if cross is not None and cfg.dx_alpha > 0:
        check_finite(cross, "the cross moment of the inherited errors")
        Hc = f_in.H if cross_H is None else stable_factor(cross_H.to(torch.float32), cfg.damp).H
        Wf = dx_corrected_target(Wf, Hc, cross.to(torch.float32), cfg.dx_alpha)
    target = Wf.clone()
    gw = grid.group_width(C)
    unit = grid.grid_unit(C)      # columns whose grids are made together

    # without act-order a group's grid is taken when its first column is reached (GPTQ); with it,
    # columns of a group are visited out of order, so a grid can only follow a row as a whole
    dynamic_groups = not (cfg.grid_at_start or cfg.act_order)
    grid_per_row = not cfg.grid_at_start and not (dynamic_groups and unit < C)
    rows_take_grids = H_out is not None and grid_per_row      # each row step sets its own grids
    scale = torch.empty_like(Wf)
    zero = torch.empty_like(Wf)
    # the hessian search weighs a column's error by its input's energy, diag(H_in): [B|1, 1, C]
    weight = f_in.H.diagonal(dim1=-2, dim2=-1).unsqueeze(1) if grid.search == "hessian" else None
    if not rows_take_grids and (cfg.grid_at_start or cfg.act_order or unit == C):
        s, z = group_params(Wf, grid, weight)
        scale[:], zero[:] = expand_groups(s, C), expand_groups(z, C)

    perm = inv = None
    if f_in.perm is not None:
        perm = f_in.perm.expand(heads, C)
        inv = torch.argsort(perm, dim=-1)
    Ho = U_out = None
    if H_out is not None:
        f_out = stable_factor(H_out.to(torch.float32), cfg.damp, "the output Hessian")
        extra["damp_out"], Ho, U_out = f_out.damp, f_out.H, f_out.U
    H_refine = f_in.H.expand(heads, C, C)

    def column_pass(scale, zero, take_grids: bool, dynamic: bool):
        """The column loop (and the row steps) from ``target``: codes and per-group grids."""
        Wp, scale, zero = (t if perm is None else _permute_cols(t, perm) for t in (target.clone(), scale, zero))
        Q = _columns_and_rows(Wp, f_in.U, U_out, scale, zero, grid, unit, dynamic, cfg, take_grids, perm, inv,
                              weight)
        if perm is not None:
            Q, scale, zero = (_permute_cols(t, inv) for t in (Q, scale, zero))
        return Q, quantize_codes(Q, scale, zero, grid.maxq), scale[..., ::gw], zero[..., ::gw]

    _, quantize_codes, dequantize = grid_functions(grid)
    Q, codes, scale_g, zero_g = column_pass(scale, zero, rows_take_grids, dynamic_groups)
    if cfg.refine_iters > 0:
        scale_g = _refined(codes, scale_g, zero_g, target, H_refine, Ho, grid, gw, cfg.refine_iters)
        Q = dequantize(codes, expand_groups(scale_g, C), expand_groups(zero_g, C))
    if cfg.passes > 1:
        # alternate: codes solved again on the refined grids, then the scales refined for those codes;
        # each pass is kept only if it lowers the objective the solver works on
        best = float(kronecker_loss(Q - target, H_refine, Ho))
        for _ in range(cfg.passes - 1):
            Q2, c2, s2, z2 = column_pass(expand_groups(scale_g, C), expand_groups(zero_g, C), False, False)
            if cfg.refine_iters > 0:
                s2 = _refined(c2, s2, z2, target, H_refine, Ho, grid, gw, cfg.refine_iters)
                Q2 = dequantize(c2, expand_groups(s2, C), expand_groups(z2, C))
            loss2 = float(kronecker_loss(Q2 - target, H_refine, Ho))
            if not loss2 < best:
                break
            best, codes, scale_g, zero_g, Q = loss2, c2, s2, z2, Q2
        extra["passes_loss"] = best

    loss = kronecker_loss(Q - W.detach().to(torch.float32).reshape(Q.shape), Hi,
                          None if H_out is None else H_out.to(torch.float32))
    return SolveResult(from_codes(codes, scale_g, zero_g, grid), float(loss), extra)


def _columns_and_rows(Wf, U_in, U_out, scale, zero, grid, unit, dynamic, cfg: SolverConfig, take_grids: bool,
                      perm, inv, weight) -> torch.Tensor:
    """The quantized ``Wf [B, R, C]`` (columns in the loop's order): GPTQ's column loop over all rows, or with
    ``U_out`` (an output Hessian) ``rows_per_step`` rows at a time with the rest compensated through it;
    ``take_grids``: each row step takes its rows' grids as compensation has left them (adaptive grid)."""
    if U_out is None:
        return gptq_columns(Wf, U_in, scale, zero, grid, unit, dynamic, cfg.block_size, weight=weight)
    Q = torch.empty_like(Wf)
    R = Wf.shape[1]
    step = max(1, cfg.rows_per_step)
    for r0 in range(0, R, step):
        r1 = min(r0 + step, R)
        if take_grids:
            s, z = _row_grid(Wf[:, r0:r1], perm, inv, grid, weight)
            scale[:, r0:r1], zero[:, r0:r1] = s, z
        Q[:, r0:r1] = gptq_columns(Wf[:, r0:r1], U_in, scale[:, r0:r1], zero[:, r0:r1], grid, unit, dynamic,
                                   cfg.block_size, weight=weight)
        if r1 < R:
            Wf[:, r1:] += row_compensation(U_out, r0, r1) @ (Wf[:, r0:r1] - Q[:, r0:r1])
    return Q


def _refined(codes, scale_g, zero_g, target, H_in, H_out, grid: GridConfig, gw: int, sweeps: int) -> torch.Tensor:
    """``refine_scales`` for the grid's form, with the scales put back on a GGUF lattice."""
    C = target.shape[-1]
    if grid.min_offset:   # W_hat = s c - m: the scales' loss is that of codes c about W + m
        scale_g = refine_scales(codes, scale_g, torch.zeros_like(zero_g), target + expand_groups(zero_g, C),
                                H_in, H_out, gw, sweeps)
    else:
        scale_g = refine_scales(codes, scale_g, zero_g, target, H_in, H_out, gw, sweeps)
    if grid.lattice is not None:   # back onto the scales the file can hold
        scale_g = place_scales(scale_g, lattice(grid.lattice))
    return scale_g


def _row_grid(rows: torch.Tensor, perm: torch.Tensor | None, inv: torch.Tensor | None, grid: GridConfig,
              weight: torch.Tensor | None = None):
    """Per-column scale and zero of ``rows [B, n, C]`` (stored in ``perm`` order, ``inv`` its inverse;
    ``weight`` in the columns' own order)."""
    C = rows.shape[-1]
    if perm is None:
        s, z = group_params(rows, grid, weight)
        return expand_groups(s, C), expand_groups(z, C)
    s, z = group_params(_permute_cols(rows, inv), grid, weight)
    return _permute_cols(expand_groups(s, C), perm), _permute_cols(expand_groups(z, C), perm)


def _permute_cols(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return t.gather(-1, perm.unsqueeze(1).expand_as(t))


def _permute_sym(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    rows = H.gather(-2, perm.unsqueeze(-1).expand_as(H))
    return rows.gather(-1, perm.unsqueeze(-2).expand_as(H))
