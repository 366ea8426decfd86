"""The solver's fast loops against plain references: GPTQ's column loop (C loop and eager block
loop against a column-by-column loop) and the screened MSE grid search (against the sequential one)."""
import pytest
import torch

from workbench.quant import grid as grid_module
from workbench.quant import native
from workbench.quant.grid import GridConfig, expand_groups, grid_functions, group_params, range_error, range_params
from workbench.quant.solver import damped, gptq_columns, inverse_cholesky_upper

needs_c = pytest.mark.skipif(not native.usable(torch.zeros(1)), reason="no C compiler for the solver's loops")

GRIDS = {
    "asym g16": GridConfig(bits=4, group_size=16),
    "sym g32": GridConfig(bits=3, group_size=32, symmetric=True),
    "row": GridConfig(bits=2, group_size=-1),
    "mse g16": GridConfig(bits=4, group_size=16, search="mse"),
    "q4_1 (minimum)": GridConfig.for_lattice("q4_1"),
    "q4_k (super-blocks)": GridConfig.for_lattice("q4_k"),
}


def reference_columns(W, U, scale, zero, grid, group_width, dynamic):
    """GPTQ without blocks: quantize column i, take its error off every later column at once."""
    W, scale, zero = W.clone(), scale.clone(), zero.clone()
    fake_quantize = grid_functions(grid)[0]
    C = W.shape[-1]
    U = U.expand(W.shape[0], C, C)
    Q = torch.empty_like(W)
    for i in range(C):
        if dynamic and group_width < C and i % group_width == 0:
            s, z = group_params(W[..., i:i + group_width], grid)
            scale[..., i:i + group_width] = expand_groups(s, group_width)
            zero[..., i:i + group_width] = expand_groups(z, group_width)
        Q[..., i] = fake_quantize(W[..., i], scale[..., i], zero[..., i], grid.maxq)
        err = (W[..., i] - Q[..., i]) / U[:, i, i].unsqueeze(-1)
        W[..., i + 1:] -= err.unsqueeze(-1) * U[:, i, i + 1:].unsqueeze(1)
    return Q, scale, zero


def column_problem(seed, B, R, C, heads_share_u=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, R, C, generator=g) * torch.rand(B, R, 1, generator=g) * 2
    n_u = 1 if heads_share_u else B
    X = torch.randn(n_u, C, 3 * C, generator=g)
    X[:, : C // 4] *= 3
    U = inverse_cholesky_upper(damped(X @ X.transpose(1, 2) / (3 * C), 0.01))
    return W, U


def static_grid(W, grid):
    s, z = group_params(W, grid)
    C = W.shape[-1]
    return expand_groups(s, C), expand_groups(z, C)


CASES = [(1, 40, 256, True), (3, 8, 256, True), (3, 5, 256, False), (2, 17, 512, True)]


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("B,R,C,shared", CASES)
def test_one_block_is_the_plain_column_loop_exactly(name, dynamic, B, R, C, shared):
    """Within one block the C loop's updates are the reference's, in the same order: the same codes.
    The eager loop takes each update as one fused multiply-add (``baddbmm``), which rounds once where
    the reference rounds twice; where the CPU's BLAS fuses it (AVX-512 here), the last bits differ and
    a rounding tie may flip a code."""
    grid = GRIDS[name]
    W, U = column_problem(B * R + C, B, R, C, shared)
    scale, zero = static_grid(W, grid)
    unit = grid.grid_unit(C)
    ref_q, ref_s, ref_z = reference_columns(W, U, scale, zero, grid, unit, dynamic)
    for eager in (False, True):
        if not eager and not native.usable(W):
            continue
        s, z = scale.clone(), zero.clone()
        q = gptq_columns(W, U, s, z, grid, unit, dynamic, block_size=C, eager=eager)
        if not eager:
            assert torch.equal(q, ref_q), name
            assert torch.equal(s, ref_s) and torch.equal(z, ref_z)
            continue
        assert_codes_agree(grid, (q, s, z), (ref_q, ref_s, ref_z))


def assert_codes_agree(grid, got, ref):
    """The codes of two loops whose weights differ in their last bits: a rounding tie may flip a code, and
    with dynamic groups that moves the row's later grids a little."""
    quantize_codes = grid_functions(grid)[1]
    (q, s, z), (ref_q, ref_s, ref_z) = got, ref
    codes, ref_codes = quantize_codes(q, s, z, grid.maxq), quantize_codes(ref_q, ref_s, ref_z, grid.maxq)
    assert (codes != ref_codes).float().mean() < 0.01
    assert ((s - ref_s).abs() > 1e-5 * ref_s.abs()).float().mean() < 0.03


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("block_size", [16, 128])
def test_blocks_keep_the_codes_of_the_plain_column_loop(name, dynamic, block_size):
    """Across blocks the lazy update sums in another order: weights differ in their last bits, a
    rounding tie may flip a code, and with dynamic groups that moves the row's later grids a little."""
    grid = GRIDS[name]
    W, U = column_problem(7, 2, 24, 512)
    scale, zero = static_grid(W, grid)
    unit = grid.grid_unit(512)
    ref_q, ref_s, ref_z = reference_columns(W, U, scale, zero, grid, unit, dynamic)
    s, z = scale.clone(), zero.clone()
    q = gptq_columns(W, U, s, z, grid, unit, dynamic, block_size)
    assert_codes_agree(grid, (q, s, z), (ref_q, ref_s, ref_z))


@needs_c
@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("B,R,C,shared", CASES)
def test_the_c_loop_keeps_the_codes_of_the_eager_loop(name, dynamic, B, R, C, shared):
    """The same updates in the same order; exactly the same only where ``baddbmm`` does not fuse its
    multiply-add (see the test above)."""
    grid = GRIDS[name]
    W, U = column_problem(B + R + C, B, R, C, shared)
    scale, zero = static_grid(W, grid)
    unit = grid.grid_unit(C)
    out = []
    for eager in (False, True):
        s, z = scale.clone(), zero.clone()
        out.append((gptq_columns(W, U, s, z, grid, unit, dynamic, block_size=48, eager=eager), s, z))
    assert_codes_agree(grid, *out)


@needs_c
def test_rows_of_a_view_and_the_weights_left_as_they_were():
    """The solver passes row slices of its weights (TurboBoA's row steps): strides of a view, inputs kept."""
    grid = GRIDS["asym g16"]
    W, U = column_problem(3, 3, 12, 256)
    scale, zero = static_grid(W, grid)
    before = W.clone()
    q = gptq_columns(W[:, 2:9], U, scale[:, 2:9], zero[:, 2:9], grid, 16, False, 128)
    ref = gptq_columns(W[:, 2:9].contiguous(), U, scale[:, 2:9].contiguous(), zero[:, 2:9].contiguous(), grid, 16,
                       False, 128, eager=True)
    assert torch.equal(q, ref) and torch.equal(W, before)


def sequential_search(monkeypatch, w, cfg):
    """The search without the screen, in eager torch: the errors the screened search takes."""
    with monkeypatch.context() as m:
        m.setattr(grid_module, "mse_screen", lambda *args: None)
        m.setenv("WORKBENCH_COMPILE", "0")
        return group_params(w, cfg)


MSE_GRIDS = [GridConfig(bits=4, group_size=32, search="mse"),
             GridConfig(bits=3, group_size=16, symmetric=True, search="mse"),
             GridConfig(bits=2, group_size=-1, search="mse"),
             GridConfig(bits=4, group_size=16, search="mse", mse_norm=2.0),
             GridConfig.for_lattice("q4_1", "mse"),
             GridConfig.for_lattice("q4_k", "mse")]


@needs_c
@pytest.mark.parametrize("cfg", MSE_GRIDS, ids=lambda c: f"{c.lattice or c.bits}-{c.group_size}-{c.mse_norm}")
@pytest.mark.parametrize("kind", ["gaussian", "heavy tails", "zero groups", "strided rows"])
def test_screened_mse_search_picks_what_the_sequential_search_picks(monkeypatch, cfg, kind):
    g = torch.Generator().manual_seed(len(kind))
    w = torch.randn(3, 20, 512, generator=g) * torch.rand(3, 20, 1, generator=g)
    if kind == "heavy tails":
        w = w ** 3
    if kind == "zero groups":
        w[..., :64] = 0
    if kind == "strided rows":      # a column block of a bigger weight, as the dynamic groups search it
        w = torch.randn(3, 20, 1024, generator=g)[..., 256:768]
    screened = group_params(w, cfg)
    sequential = sequential_search(monkeypatch, w, cfg)
    assert torch.equal(screened[0], sequential[0]) and torch.equal(screened[1], sequential[1])


@needs_c
@pytest.mark.parametrize("norm", [2.4, 1.0, 3.0])
@pytest.mark.parametrize("symmetric,min_offset", [(False, False), (True, False), (False, True)])
def test_screened_errors_are_within_their_bound(norm, symmetric, min_offset):
    """Each screened error, and the exact one the search compares, within 1e-4 of the true sum."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g) * torch.logspace(-6, 3, 300).unsqueeze(-1)
    lo, hi = w.amin(-1), w.amax(-1)
    shrinks = torch.tensor([1 - i / 80 for i in range(65)])
    approx = native.mse_screen(w, lo, hi, shrinks, 15, symmetric, min_offset, norm, float("inf"), 0.0)
    fake_quantize = grid_functions(GridConfig.for_lattice("q4_1") if min_offset else GridConfig())[0]
    for c in (0, 10, 64):
        s, z = range_params(lo.unsqueeze(-1), hi.unsqueeze(-1), 15, symmetric, shrinks[c], min_offset)
        true = (fake_quantize(w, s, z, 15) - w).abs().double().pow(norm).sum(-1)
        exact = range_error(w, s, z, 15, norm, min_offset).squeeze(-1)
        for errors in (approx[:, c], exact):
            assert torch.all((errors.double() - true).abs() <= 1e-4 * true + 1e-30)


def test_without_compiling_both_run_in_eager_torch(monkeypatch):
    monkeypatch.setenv("WORKBENCH_COMPILE", "0")
    x = torch.zeros(2, 8)
    assert native.block_columns(x) is None
    assert native.mse_screen(x, x[:, 0], x[:, 0], x[0], 15, False, False, 2.4, 1.0, 0.0) is None


def test_a_compiler_that_fails_leaves_the_eager_loops_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        assert native.block_columns(torch.zeros(2, 8)) is None
    W, U = column_problem(0, 1, 4, 32)
    grid = GRIDS["asym g16"]
    scale, zero = static_grid(W, grid)
    assert torch.equal(gptq_columns(W, U, scale, zero, grid, 16, False, 128),
                       reference_columns(W, U, scale, zero, grid, 16, False)[0])
