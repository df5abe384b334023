"""Lion: the sign of an interpolated momentum.

Paper: Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675.
The math: ``docs/algorithms.md`` §5::

    c = β1·m + (1−β1)·g
    p ← p·(1 − lr·wd) ;  p ← p − lr·sign(c)
    m ← β2·m + (1−β2)·g

The functional core :func:`lion` takes per-parameter step coefficients (:class:`LionStep`)
so that Lion-PMA (:mod:`leanopt.pma`) runs the same code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._optimizer import BOOL, NONNEG, Betas, LeanOptimizer, ParamsT, decoupled_decay_, scalar, step_tensor
from . import _native
from ._compile import Kernel, fusable_groups, hyper
from .mask import agreement, mask_active, mask_checks, mask_defaults, masked_update_, step_

__all__ = ["Lion", "LionStep", "lion", "lion_step"]


class LionStep(NamedTuple):
    """``c = c_keep·m + c_gain·g``; ``m ← m_keep·m + m_gain·g``; decay with ``decay_lr``;
    step ``lr·sign(c)``; afterwards ``m ← rescale·m``."""

    lr: float | Tensor
    decay_lr: float | Tensor
    c_keep: float
    c_gain: float
    m_keep: float
    m_gain: float
    rescale: float = 1.0


def nan_sign(c: Tensor) -> Tensor:
    """``sign(c)``, but NaN where ``c`` is not finite (``c − c`` is 0 or NaN): the sign of
    ±Inf is finite, and a non-finite gradient element must reach its parameter
    (``docs/algorithms.md`` §0) instead of hiding in the momentum forever."""
    return c.sign().add_(c - c)


def lion_step(lr: float | Tensor, beta1: float, beta2: float) -> LionStep:
    return LionStep(lr, lr, beta1, 1 - beta1, beta2, 1 - beta2)


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    coeffs: list[LionStep],
    *,
    weight_decay: float,
    maximize: bool,
    mask: str,
    alpha: str,
    count_scale: bool,
) -> None:
    """Functional Lion step over lists of tensors (per-tensor reference path)."""
    masked = mask_active(mask, count_scale)
    for p, g, m, c in zip(params, grads, exp_avgs, coeffs, strict=True):
        if maximize:
            g = -g
        phi = agreement(g, m) if mask == "async" else None
        update = nan_sign(m.mul(c.c_keep).add_(g, alpha=c.c_gain))
        m.mul_(c.m_keep).add_(g, alpha=c.m_gain)
        if mask == "sync":
            phi = agreement(g, m)
        decoupled_decay_(p, c.decay_lr, weight_decay)
        if masked:
            masked_update_(p, update, phi, c.lr, alpha=alpha, count_scale=count_scale)
        else:
            p.add_(update, alpha=-c.lr)
        if c.rescale != 1:
            m.mul_(c.rescale)


def _lion_kernel(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], H: Tensor, sums: Tensor | None, phase: str,
                 mask: str, alpha: str, count_scale: bool) -> Tensor | None:
    # H rows: [sign, c_keep, c_gain, m_keep, m_gain, decay, lr, rescale]; one pass per tensor
    # (plus the sums pass with the mask; Kernel.step)
    out = []
    for i, (p, g, m) in enumerate(zip(ps, gs, ms)):
        h = H[i]
        g = g * h[0]
        m_new = m * h[3] + g * h[4]
        u = nan_sign(m * h[1] + g * h[2])
        part = step_(p, u, h[5], h[6], g, m, m_new, None if sums is None else sums[i], phase=phase, mask=mask, alpha=alpha,
                     count_scale=count_scale)
        if part is not None:  # the sums call writes nothing
            out.append(part)
            continue
        m.copy_(m_new * h[7])
    return torch.stack(out) if out else None


_FUSED = Kernel(_lion_kernel)


def _rows(c: LionStep, maximize: bool, weight_decay: float) -> list[float]:
    """A tensor's scalars for both fast kernels: [sign, c_keep, c_gain, m_keep, m_gain, decay, lr, rescale]."""
    return [-1.0 if maximize else 1.0, c.c_keep, c.c_gain, c.m_keep, c.m_gain, 1 - float(c.decay_lr) * weight_decay,
            float(c.lr), c.rescale]


def lion_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    coeffs: list[LionStep],
    *,
    weight_decay: float,
    maximize: bool,
    mask: str,
    alpha: str,
    count_scale: bool,
) -> None:
    """:func:`lion` as fast kernels: without the mask, float32 and bfloat16 tensors on the CPU
    go to the C kernel (:mod:`leanopt._native`), all in one call; the rest to one compiled
    kernel per group of tensors (:mod:`leanopt._compile`)."""
    native, others = _native.split(len(params), lambda i: not mask_active(mask, count_scale) and _native.supports(
        params[i], grads[i], exp_avgs[i]))
    if native:
        _native.lion([params[i] for i in native], [grads[i] for i in native], [exp_avgs[i] for i in native],
                     [_rows(coeffs[i], maximize, weight_decay) for i in native])
        params, grads, exp_avgs, coeffs = ([x[i] for i in others] for x in (params, grads, exp_avgs, coeffs))
    calls, rest = fusable_groups(params, exp_avgs)
    for idx in calls:
        rows = [_rows(coeffs[i], maximize, weight_decay) for i in idx]
        _FUSED.step([params[i].view(-1) for i in idx], [grads[i].reshape(-1) for i in idx], [exp_avgs[i].view(-1) for i in idx],
                    H=hyper(rows, params[idx[0]]), mask=mask, alpha=alpha, count_scale=count_scale)
    if rest:
        lion(*([x[i] for i in rest] for x in (params, grads, exp_avgs, coeffs)), weight_decay=weight_decay,
             maximize=maximize, mask=mask, alpha=alpha, count_scale=count_scale)


class Lion(LeanOptimizer):
    """Lion (arXiv:2302.06675): sign of the interpolated momentum; state is one momentum
    buffer (``exp_avg``) per parameter.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: learning rate (Lion's are typically 3-10x smaller than AdamW's). Default 1e-4.
        betas: ``(β1, β2)``: interpolation and momentum coefficients. Default (0.9, 0.99).
        weight_decay: decoupled weight decay ``p·(1 − lr·wd)`` (as ``lion-pytorch``). Default 0.
        mask, alpha, count_scale: the AlphaAdam mask component (:mod:`leanopt.mask`) with
            ``u = sign(c)`` and ``m`` Lion's momentum. Default ``mask="none"`` (plain Lion);
            with a mask on, ``alpha`` and ``count_scale`` default to AlphaAdam's.
        maximize: maximize the objective instead of minimizing it. Default False.
        fused: run each step as compiled kernels (``torch.compile``: one pass over memory
            per tensor, two with a mask; the first step compiles, which takes seconds up
            to a minute for a large model). Default False.
        skip_nonfinite: skip the step of a parameter whose gradient holds a NaN or an
            Inf (state untouched) and count it in ``nonfinite_skips``; without it, the
            non-finite value reaches that element only (``docs/algorithms.md`` §0). Default False.
    """

    _checks = {"lr": NONNEG, "betas": Betas(), "weight_decay": NONNEG, "maximize": BOOL, "fused": BOOL, **mask_checks()}
    _state_keys = ("step", "exp_avg")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        mask: str = "none",
        alpha: str | None = None,
        count_scale: bool | None = None,
        maximize: bool = False,
        fused: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, fused=fused,
                        skip_nonfinite=skip_nonfinite, **mask_defaults(mask, alpha, count_scale), **self._extra_defaults)
        super().__init__(params, defaults)

    def _coeffs(self, group: dict[str, Any], lr: float, step: float) -> LionStep:
        return lion_step(lr, *group["betas"])

    def _update(self) -> None:
        for group in self.param_groups:
            params, grads = self._grads(group)
            if not params:
                continue
            exp_avgs, coeffs = [], []
            lr = scalar(group["lr"])  # once per group: a tensor lr is read (synced) once
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = step_tensor()
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avgs.append(state["exp_avg"])
                coeffs.append(self._coeffs(group, lr, state["step"].item()))
            (lion_fused if group["fused"] else lion)(
                params, grads, exp_avgs, coeffs,
                weight_decay=group["weight_decay"], maximize=group["maximize"],
                mask=group["mask"], alpha=group["alpha"], count_scale=group["count_scale"],
            )
