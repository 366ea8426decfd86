"""What each quantized linear costs the model at each candidate width, on one scale for all layers.

Both signals price the round-to-nearest error ``dW`` of the candidate grid (the run's group size,
symmetry and range search), the error the layer would make at that width:

- ``fisher``: ``1/2 E_t sum_i g_ti^2 (dW x_t)_i^2``, token by token: ``x_t`` is the layer's input at
  token ``t`` and ``g_t`` the gradient of the window's summed token loss with respect to the layer's
  output there, both from one forward and backward pass of the full-precision model. It is the
  diagonal Fisher estimate of the mean token loss's rise (nats) if only that layer were quantized.
  Each token's error is weighed by that token's own gradient: the product of the means,
  ``sum_i E[g_i^2] E[(dW x)_i^2]``, lets a few tokens with large inputs but little pull on the loss
  (the first tokens of a window, where this model's activations are largest) set the cost, and
  plans made on it were measured worse (README, "Mixed precision").
- ``objective``: ``sum_i r_i / sum_i (W H W^T)_ii`` with ``r_i = (dW H dW^T)_ii`` and ``H = E[x x^T]``,
  the relative output error, the same for a layer wherever it sits in the model.

Costs of different layers are added up by the allocation, as if their errors did not interact.
``H`` is gathered block by block on the full-precision model (one block's statistics in memory
at a time, as the engine does), the fisher pass runs with the whole model on the device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distributed import SINGLE, Ranks
from ..engine import advance_stages, block_inputs, to_device
from ..errors import Cancelled
from ..hessians import InputCovariance
from ..quant.grid import GridConfig, rtn
from .plan import Layer

FISHER, OBJECTIVE = "fisher", "objective"
SIGNALS = (FISHER, OBJECTIVE)


@dataclass
class RowErrors:
    """One layer's output error per output row, ``E[(dW x)_i^2]``, for each candidate width, and the
    energy of its output rows ``E[(W x)_i^2]``."""
    candidates: dict[int, torch.Tensor]
    energy: torch.Tensor


def objective_cost(rows: torch.Tensor, energy: torch.Tensor) -> float:
    total = float(energy.sum())
    return float(rows.sum()) / total if total > 0 else 0.0


def objective_costs(errors: dict[str, RowErrors]) -> dict[str, dict[int, float]]:
    """Layer name -> width -> relative output error."""
    return {n: {b: objective_cost(r, e.energy) for b, r in e.candidates.items()} for n, e in errors.items()}


def candidate_errors(W: torch.Tensor, grid: GridConfig, candidates: tuple[int, ...]) -> torch.Tensor:
    """``[len(candidates) * d_out, d_in]``: the round-to-nearest error of ``W`` on each candidate grid,
    stacked by width, so that one product gives a token's output errors at every width."""
    W32 = W.detach().float()
    return torch.cat([rtn(W32, dataclasses.replace(grid, bits=b)) - W32 for b in candidates])


def row_errors_of(W: torch.Tensor, H: torch.Tensor, grid: GridConfig, candidates: tuple[int, ...]) -> RowErrors:
    """``H`` is ``InputCovariance.H``, twice ``E[x x^T]``."""
    W32 = W.float()
    rows = lambda dW: ((dW @ H) * dW).sum(1).double().cpu() / 2  # noqa: E731
    return RowErrors({b: rows(rtn(W32, dataclasses.replace(grid, bits=b)) - W32) for b in candidates}, rows(W32))


def _check(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled("run cancelled while measuring the layers' sensitivity")


@torch.no_grad()
def row_errors(model, family, layers: list[Layer], ids: torch.Tensor, grid: GridConfig, candidates: tuple[int, ...],
               device, batch_size: int, ranks: Ranks = SINGLE, cancel=None, progress=None) -> dict[str, RowErrors]:
    """Every layer's ``RowErrors`` on the calibration windows ``ids``, the model in full precision (on the
    CPU; each block visits ``device`` for its turn)."""
    wanted = {(l.block, l.kind): l.name for l in layers}
    blocks = family.blocks(model)
    last = max(l.block for l in layers)
    hidden = [h.cpu() for h in block_inputs(model, family, ids, batch_size)]
    ctx = to_device(family.context(model, hidden[0]), device)
    out = {}
    for b in range(last + 1):
        if progress is not None:
            progress(b, last + 1)
        block = blocks[b].to(device)
        try:
            gens = [family.block_forward(block, h.to(device), ctx) for h in hidden]
            stages, outs = advance_stages(gens)
            while stages is not None:
                _check(cancel)
                todo = [k for k in stages[0].kinds if (b, k) in wanted]
                if todo:
                    cov = InputCovariance(stages[0].x.shape[-1], device)
                    for st in stages:
                        cov.add(st.x)
                    cov.reduce(ranks)
                    for k in todo:
                        out[wanted[b, k]] = row_errors_of(family.linear(block, k).weight.data, cov.H, grid, candidates)
                stages, outs = advance_stages(gens)
            hidden = [o.cpu() for o in outs]
        finally:
            blocks[b] = block.cpu()
    if progress is not None:
        progress(last + 1, last + 1)
    return out


def fisher_costs(model, layers: list[Layer], ids: torch.Tensor, grid: GridConfig, candidates: tuple[int, ...],
                 device, batch_size: int, ranks: Ranks = SINGLE, cancel=None, progress=None,
                 grid_progress=None) -> dict[str, dict[int, float]]:
    """Layer name -> width -> ``fisher`` cost over every position of the windows ``ids``.

    The candidates' errors are made first (the ``[len(candidates) * d_out, d_in]`` stack of every layer
    is kept for the pass: a float32 copy of the quantized weights per width). The
    model's parameters are frozen for the pass: the graph starts at the embeddings' output, so no
    weight gradient is made, only the activations' (the whole model sits on ``device`` for it).
    """
    errors = {}
    for i, l in enumerate(layers):
        if grid_progress is not None:
            grid_progress(i, len(layers))
        _check(cancel)
        errors[l.name] = candidate_errors(model.get_submodule(l.name).weight.to(device), grid, candidates)
    if grid_progress is not None:
        grid_progress(len(layers), len(layers))
    sums = {l.name: torch.zeros(len(candidates), dtype=torch.float64, device=device) for l in layers}

    def watch(name):
        stack = errors[name]

        def on_output(module, inputs, output):
            x = inputs[0].detach()

            def on_gradient(g):
                e = (x.reshape(-1, x.shape[-1]).float() @ stack.T).view(-1, len(candidates), g.shape[-1])
                g2 = g.detach().float().reshape(-1, 1, g.shape[-1]).pow(2)
                sums[name].add_((e.pow_(2) * g2).sum((0, 2)).double())

            output.register_hook(on_gradient)
        return on_output

    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    hooks = [model.get_submodule(l.name).register_forward_hook(watch(l.name)) for l in layers]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_()))
    positions = 0
    try:
        for p in params:
            p.requires_grad_(False)
        model.to(device)
        n = ids.shape[0]
        for i in range(0, n, batch_size):
            if progress is not None:
                progress(i, n)
            _check(cancel)
            x = ids[i:i + batch_size].to(device)
            with torch.enable_grad():
                logits = model(x, use_cache=False).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
            positions += x.numel()
            del logits, loss
        if progress is not None:
            progress(n, n)
    finally:
        for h in hooks:
            h.remove()
        for p, t in zip(params, trainable):
            p.requires_grad_(t)
        model.to("cpu")
    ranks.sum_(*sums.values())
    positions = max(ranks.sum_numbers(positions)[0], 1)
    return {name: {b: 0.5 * float(v) / positions for b, v in zip(candidates, s.cpu())} for name, s in sums.items()}
