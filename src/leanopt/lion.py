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

import functools
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _native
from ._backend import Backends, every_row
from ._compile import field_index, fusable_groups, hyper
from .precision import CompactKernel, flat, precision_defaults
from ._optimizer import (BOOL, BOOL_OR_NONE, NONNEG, Betas, LeanOptimizer, ParamsT, decay_, decay_factor, direction, scalar,
                         step_tensor)
from ._distributed import Piece
from .mask import agreement, mask_active, unmasked, mask_checks, mask_defaults, masked_update_, native_two_pass, step_, two_pass

__all__ = ["Lion", "LionStep", "lion", "lion_step"]


class LionStep(NamedTuple):
    """The scalars of one Lion-family step for one parameter, in the order of the C
    kernel's row (``LI_*`` of ``csrc/cpu_kernels.c``)::

        g ← sign·g ;  c = c_keep·m + c_gain·g ;  m ← m_keep·m + m_gain·g
        p ← decay·p ;  p ← p − lr·sign(c)   (or the masked step)
        m ← rescale·m
    """

    sign: float
    c_keep: float
    c_gain: float
    m_keep: float
    m_gain: float
    decay: float
    lr: float
    rescale: float = 1.0


_F = field_index(LionStep)


def nan_sign(c: Tensor) -> Tensor:
    """``sign(c)``, but NaN where ``c`` is not finite (``c − c`` is 0 or NaN): the sign of
    ±Inf is finite, and a non-finite gradient element must reach its parameter
    (``docs/algorithms.md`` §0) instead of hiding in the momentum forever."""
    return c.sign().add_(c - c)


def lion_step(lr: float, beta1: float, beta2: float, *, weight_decay: float, maximize: bool, c_keep: float | None = None,
              c_gain: float | None = None, m_keep: float | None = None, m_gain: float | None = None,
              decay_lr: float | None = None, rescale: float = 1.0) -> LionStep:
    """Lion's coefficients (as ``lion-pytorch``); a variant (Lion-PMA) passes its own
    interpolation and momentum weights, decay rate and rescale."""
    return LionStep(direction(maximize), beta1 if c_keep is None else c_keep, 1 - beta1 if c_gain is None else c_gain,
                    beta2 if m_keep is None else m_keep, 1 - beta2 if m_gain is None else m_gain,
                    decay_factor(lr if decay_lr is None else decay_lr, weight_decay), lr, rescale)


def lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], coeffs: list[LionStep], *, mask: str,
         alpha: str, count_scale: bool, pieces: list[Piece | None] | None = None) -> None:
    """Functional Lion step over lists of tensors (per-tensor reference path); ``pieces``:
    of sharded tensors, which part each tensor is (:mod:`leanopt._backend`)."""
    masked = mask_active(mask, count_scale)
    for p, g, m, c, piece in zip(params, grads, exp_avgs, coeffs, pieces or [None] * len(params), strict=True):
        if c.sign < 0:
            g = -g
        phi = agreement(g, m) if mask == "async" else None
        update = nan_sign(m.mul(c.c_keep).add_(g, alpha=c.c_gain))
        m.mul_(c.m_keep).add_(g, alpha=c.m_gain)
        if mask == "sync":
            phi = agreement(g, m)
        decay_(p, c.decay)
        if masked:
            masked_update_(p, update, phi, c.lr, alpha=alpha, count_scale=count_scale, piece=piece)
        else:
            p.add_(update, alpha=-c.lr)
        if c.rescale != 1:
            m.mul_(c.rescale)


def _lion_kernel(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], H: Tensor, sums: Tensor | None, phase: str,
                 mask: str, alpha: str, count_scale: bool, whole: Tensor | None = None) -> Tensor | None:
    # H: one LionStep per row; one pass per tensor (plus the sums pass with the mask)
    out = []
    for i, (p, g, m) in enumerate(zip(ps, gs, ms)):
        h = H[i]
        g = g * h[_F.sign]
        m_new = m * h[_F.m_keep] + g * h[_F.m_gain]
        u = nan_sign(m * h[_F.c_keep] + g * h[_F.c_gain])
        part = step_(p, u, h[_F.decay], h[_F.lr], g, m, m_new, None if sums is None else sums[i], phase=phase, mask=mask,
                     alpha=alpha, count_scale=count_scale, numel=None if whole is None else whole[i])
        if part is not None:  # the sums call writes nothing
            out.append(part)
            continue
        m.copy_(m_new * h[_F.rescale])
    return torch.stack(out) if out else None


_KERNEL = CompactKernel(_lion_kernel)  # compact state: decoded and encoded in the kernel's passes


def _lion_compiled(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], coeffs: list[LionStep], *, mask: str,
                   alpha: str, count_scale: bool, pieces: list[Piece | None] | None = None) -> None:
    calls = [(idx, tuple([flat(x[i], params[i]) for i in idx] for x in (params, grads, exp_avgs)),
              hyper([coeffs[i] for i in idx], params[idx[0]])) for idx in fusable_groups(params)]
    two_pass(_KERNEL, calls, params, pieces, mask=mask, alpha=alpha, count_scale=count_scale)


def _lion_native(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], coeffs: list[LionStep], *, mask: str,
                 alpha: str, count_scale: bool, pieces: list[Piece | None] | None = None) -> None:
    """The step by the C kernels: one pass, two with the mask (its sums over the ranks
    between them for shards: ``pieces``)."""
    if not mask_active(mask, count_scale):
        _native.lion(params, grads, exp_avgs, coeffs)
        return
    native_two_pass(functools.partial(_native.elementwise_masked, "lion"), [params, grads, exp_avgs, coeffs], pieces,
                    mask=mask, alpha=alpha, count_scale=count_scale)


def _lion_compact(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Any], coeffs: list[LionStep], *, mask: str,
                  alpha: str, count_scale: bool) -> None:
    for p, g, m, c in zip(params, grads, exp_avgs, coeffs):  # compact momenta: one pass per tensor, two with the mask
        _native.compact_step("lion", p, g, m, None, c, mask=mask, alpha=alpha, count_scale=count_scale)


BACKENDS = Backends(streams=3, eager=lion, compiled=_lion_compiled, compiled_shards=every_row, native=_lion_native,
                    elementwise=unmasked, compact=_lion_compact, compact_takes=every_row,
                    sharded=_lion_native, compiled_compact=True)


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
        fused: which backend runs the step, as :class:`leanopt.AlphaAdam` (the C kernel
            takes unmasked steps; masked ones on the CPU take the eager path by default).
            Default None (the fastest).
        skip_nonfinite: skip the step of a parameter whose gradient holds a NaN or an
            Inf (state untouched) and count it in ``nonfinite_skips``; without it, the
            non-finite value reaches that element only (``docs/algorithms.md`` §0). Default False.
        state_precision, state_block_size, state_min_size, stochastic_rounding: how the
            state is stored (``"param"``, ``"bf16"``, ``"int8"``, ``"int4"``) and whether
            bfloat16 parameters are rounded stochastically; the same on every leanopt
            optimizer (:mod:`leanopt.precision`, ``docs/algorithms.md`` §8).
    """

    _checks = {"lr": NONNEG, "betas": Betas(), "weight_decay": NONNEG, "maximize": BOOL, "fused": BOOL_OR_NONE, **mask_checks()}
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
        fused: bool | None = None,
        skip_nonfinite: bool = False,
        state_precision: str | dict[str, str] = "param",
        state_block_size: int = 256,
        state_min_size: int = 4096,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, fused=fused,
                        skip_nonfinite=skip_nonfinite, **mask_defaults(mask, alpha, count_scale),
                        **precision_defaults(state_precision, state_block_size, state_min_size, stochastic_rounding), **self._extra_defaults)
        super().__init__(params, defaults)

    def _coeffs(self, group: dict[str, Any], lr: float, step: float) -> LionStep:
        return lion_step(lr, *group["betas"], weight_decay=group["weight_decay"], maximize=group["maximize"])

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
                state["step"] += 1
                exp_avgs.append(self._element_state(group, p, "exp_avg"))
                coeffs.append(self._coeffs(group, lr, state["step"].item()))
            self._route(BACKENDS, group, params, grads, exp_avgs, coeffs, mask=group["mask"], alpha=group["alpha"],
                        count_scale=group["count_scale"])
