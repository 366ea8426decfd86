"""The compiled elementwise kernels of learned rounding with a fixed grid.

With the step size fixed, the clamped codes are affine in the rounding variable ``h``, so a
whole optimizer step (gradient through the soft weight, Adam, the rounding regularizer and the
next soft weight) is one pass over the weight: these functions are that pass, written for
``torch.compile`` (``quant.compiled.kernel``). The optimizer that drives them is ``quant.rounding``.
"""
from __future__ import annotations

import torch

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def _abs_pow(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``|t| ** p`` for ``p >= 1`` as exp(p log|t|): vectorized where compiled, unlike a tensor power."""
    return torch.exp(p * torch.log(t.abs().clamp_min(1e-30)))


def soft_weight_and_regularizer(v, A, C, beta, zeta_gamma: float, gamma: float):
    """``(C + A * h(V), sum(1 - |2h - 1|^beta))`` for a fixed grid.

    With the step size fixed, the clamped codes are affine in ``h`` (``A``, ``C`` fold in the
    scale and the clamp to ``[0, maxq]``), so the soft weight is one multiply-add.
    """
    h = _soft_h(v, zeta_gamma, gamma)
    reg = _sum(1 - _abs_pow(2 * h - 1, beta))
    return torch.addcmul(C, A, h), reg


def _soft_h(v, zeta_gamma: float, gamma: float):
    return (torch.sigmoid(v) * zeta_gamma + gamma).clamp(0, 1)


def _sum(t: torch.Tensor) -> torch.Tensor:
    """A float32 sum over a whole weight accumulated in float64, so the recorded regularizer does
    not depend on how a compiled loop splits the sum (at no measurable cost in the kernels)."""
    return t.sum(dtype=torch.float64).to(t.dtype)


def soft_weight_grad(v, grad_w, A, beta, reg_weight, zeta_gamma: float, gamma: float):
    """``(d(rec + reg_weight * reg) / dV, reg)`` from ``d rec / dW_hat`` for the soft weight above."""
    sig = torch.sigmoid(v)
    raw = sig * zeta_gamma + gamma
    t = 2 * raw.clamp(0, 1) - 1
    p = _abs_pow(t, beta - 1)
    reg = _sum(1 - t.abs() * p)          # |t| * |t|^(beta - 1): the regularizer from the same power
    # d reg / dh = -2 beta |2h - 1|^(beta - 1) sign(2h - 1)
    g_h = grad_w * A - torch.copysign(2 * reg_weight * beta * p, t)
    return _through_h(g_h, sig, raw, zeta_gamma), reg


def _through_h(g_h, sig, raw, zeta_gamma: float):
    """``d / dV`` from ``d / dh``: ``dh/dV = (zeta - gamma) sigma (1 - sigma)`` where the clamp is
    inactive, 0 where h is 0 or 1."""
    inside = (raw > 0) & (raw < 1)
    return torch.where(inside, g_h * (zeta_gamma * sig * (1 - sig)), torch.zeros_like(g_h))


def _adam_update(v, m, s, g, lr, bias1, bias2):
    """``torch.optim.Adam``'s step on ``v`` in place (``m``, ``s``: its moments)."""
    b1, b2 = ADAM_BETAS
    m.mul_(b1).add_(g, alpha=1 - b1)
    s.mul_(b2).addcmul_(g, g, value=1 - b2)
    v.sub_(lr / bias1 * m / (s.sqrt() / bias2.sqrt() + ADAM_EPS))


def adam_rounding_step(v, m, s, grad_w, A, C, beta, reg_weight, lr, bias1, bias2,
                       zeta_gamma: float, gamma: float):
    """One Adam step on ``V`` (in place, as ``torch.optim.Adam``) from ``d rec / dW_hat``.

    Returns the regularizer at the ``V`` it started from and the soft weight of the next step, so
    one pass over the weight serves a whole step.
    """
    g, reg = soft_weight_grad(v, grad_w, A, beta, reg_weight, zeta_gamma, gamma)
    _adam_update(v, m, s, g, lr, bias1, bias2)
    return torch.addcmul(C, A, _soft_h(v, zeta_gamma, gamma)), reg


def adam_warmup_step(v, m, s, grad_w, A, C, lr, bias1, bias2, zeta_gamma: float, gamma: float):
    """``adam_rounding_step`` while the regularizer is off: no power of ``h`` to take, which
    halves the step's elementwise time. A function of its own, so that it is compiled apart."""
    sig = torch.sigmoid(v)
    raw = sig * zeta_gamma + gamma
    _adam_update(v, m, s, _through_h(grad_w * A, sig, raw, zeta_gamma), lr, bias1, bias2)
    return torch.addcmul(C, A, _soft_h(v, zeta_gamma, gamma))
