"""PMA: AdamW-PMA and Lion-PMA, which replace gradient accumulation.

Paper: "Accelerating Large-Scale Post-Training with Periodic Moving Averages" — the PMA
paper (Algorithms 1-2, Sec. 3.2). The math: ``docs/algorithms.md`` §6.

With micro-batch B and period K, call ``step()`` after *every* micro-batch. Step ``t``
(the parameter's own step count, kept in its state, so resuming mid-period is exact)
is in period ``P = ceil(t/K)`` at position ``s = t mod K``; ``s = 0`` is the period's
*large* step, the others are *small* steps. AdamW-PMA, ``variant="paper"``::

    large (s = 0):  lr_t = lr ;        m ← β1·m + (1−β1)·g/K ;          v ← β2·v + (1−β2)·g²/K
    small (s > 0):  lr_t = lr/sqrt(K); m ← s/(s+1)·m + (1−β1)/(s+1)·g ; v ← s/(s+1)·v + (1−β2)/(s+1)·g²
    m̂ = m/(1−β1^P) ;  v̂ = v/((1−β2^P)/K)
    p ← p·(1 − lr_t·wd) ;  p ← p − lr_t·m̂/(sqrt(v̂) + eps)
    after a large step: m ← K·m ; v ← K·v

Lion-PMA, ``variant="paper"``::

    large: lr_t = lr ;   c = β1·m + (1−β1)·g/K ;        m ← β2·m + (1−β2)·g/K
    small: lr_t = lr/K ; c = s/(s+1)·m + (1−β1)/(s+1)·g ; m ← s/(s+1)·m + (1−β2)/(s+1)·g
    p ← p·(1 − lr_t·wd) ;  p ← p − lr_t·sign(c) ;  after a large step: m ← K·m

With K = 1 both are exactly AdamW and Lion. ``variant="released"`` is the authors'
released code, which differs (see :func:`adamw_pma_step` and :func:`lion_pma_step`).
The learning-rate scheduler sets ``lr``; PMA derives ``lr_t`` from it at every step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from torch import Tensor

from ._optimizer import IntAtLeast, OneOf, ParamsT
from .alpha_adam import AdamStep, AlphaAdam, adam_step
from .lion import Lion, LionStep, lion_step

__all__ = ["AdamWPMA", "LionPMA", "PeriodPosition", "period_position", "adamw_pma_step", "lion_pma_step"]

VARIANTS = ("paper", "released")


class PeriodPosition(NamedTuple):
    large: bool  # s == 0: the period's large step
    s: int  # position t mod K
    period: int  # P = ceil(t/K), the paper's bias-correction exponent
    released_period: int  # L = floor(t/K) + 1, the released code's exponent


def period_position(step: int, period: int) -> PeriodPosition:
    s = step % period
    return PeriodPosition(s == 0, s, -(-step // period), step // period + 1)


def _moment_weights(pos: PeriodPosition, beta: float, k: int) -> tuple[float, float]:
    """(keep, gain) of ``x ← keep·x + gain·g`` for one moment with coefficient ``beta``."""
    if pos.large:
        return beta, (1 - beta) / k
    return pos.s / (pos.s + 1), (1 - beta) / (pos.s + 1)


def adamw_pma_step(lr: float, beta1: float, beta2: float, step: int, k: int, variant: str, *, eps: float,
                   weight_decay: float, maximize: bool) -> AdamStep:
    """AdamW-PMA's coefficients at ``step``.

    ``variant="released"``: exponent ``L = floor(t/K)+1`` for the bias corrections, no
    rescaling of the moments after large steps, and on small steps the v-correction
    outside the root: ``(m/(1−β1^L)) / ((sqrt(v) + eps)/(1−β2^L))``.
    """
    pos = period_position(step, k)
    m_keep, m_gain = _moment_weights(pos, beta1, k)
    v_keep, v_gain = _moment_weights(pos, beta2, k)
    moments = dict(m_keep=m_keep, m_gain=m_gain, v_keep=v_keep, v_gain=v_gain)
    lr_t = lr if pos.large else lr / math.sqrt(k)
    common = dict(weight_decay=weight_decay, maximize=maximize)
    if variant == "paper":
        p = pos.period
        return adam_step(lr_t, beta1, beta2, step, eps=eps, **common, **moments, m_div=1 - beta1**p,
                         v_div=math.sqrt((1 - beta2**p) / k), rescale=float(k) if pos.large else 1.0)
    ell = pos.released_period
    bc1, bc2 = 1 - beta1**ell, 1 - beta2**ell
    if pos.large:
        return adam_step(lr_t, beta1, beta2, step, eps=eps, **common, **moments, m_div=bc1, v_div=math.sqrt(bc2))
    return adam_step(lr_t, beta1, beta2, step, eps=eps * (1 / bc2), **common, **moments, m_div=bc1, v_div=bc2)


def lion_pma_step(lr: float, beta1: float, beta2: float, step: int, k: int, variant: str, *, weight_decay: float,
                  maximize: bool) -> LionStep:
    """Lion-PMA's coefficients at ``step``; ``variant="released"`` decays the weights with
    the full ``lr`` on small steps (the paper: ``lr/K``)."""
    pos = period_position(step, k)
    c_keep, c_gain = _moment_weights(pos, beta1, k)
    m_keep, m_gain = _moment_weights(pos, beta2, k)
    lr_t = lr if pos.large else lr / k
    return lion_step(lr_t, beta1, beta2, weight_decay=weight_decay, maximize=maximize, c_keep=c_keep, c_gain=c_gain,
                     m_keep=m_keep, m_gain=m_gain, decay_lr=lr if variant == "released" else lr_t,
                     rescale=float(k) if pos.large else 1.0)


_PMA_CHECKS = {"period": IntAtLeast(1), "variant": OneOf(VARIANTS)}


class AdamWPMA(AlphaAdam):
    """AdamW-PMA (the PMA paper, Algorithm 1): AdamW whose moments average each period's
    K micro-batch gradients with equal weight, as gradient accumulation would, while
    still moving the weights at every micro-batch. Call ``step()`` after every
    micro-batch; the update is in the module docstring. State: ``step``, ``exp_avg``,
    ``exp_avg_sq`` (the period position is ``step mod period``).

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: learning rate of the large steps (small steps use ``lr/sqrt(period)``). Default 1e-3.
        betas: ``(β1, β2)``. Default (0.9, 0.95), the paper's.
        eps: added to ``sqrt(v̂)``. Default 1e-8.
        weight_decay: decoupled weight decay with the step's ``lr_t``. Default 1e-2.
        period: K, the number of micro-batches the accumulation being replaced would sum. Default 4.
        variant: ``"paper"`` (default) or ``"released"`` (the authors' code).
        mask, alpha, count_scale: the AlphaAdam mask component (:mod:`leanopt.mask`);
            default ``mask="none"``.
        maximize: maximize the objective instead of minimizing it. Default False.
        fused: the backend, as :class:`AlphaAdam`. Default None (the fastest).
        skip_nonfinite: skip the step of a parameter whose gradient holds a NaN or an
            Inf (state untouched) and count it in ``nonfinite_skips``; without it, the
            non-finite value reaches that element only (``docs/algorithms.md`` §0). Default False.
        state_precision, state_block_size, state_min_size, stochastic_rounding: how the
            state is stored (``"param"``, ``"bf16"``, ``"int8"``, ``"int4"``) and whether
            bfloat16 parameters are rounded stochastically; the same on every leanopt
            optimizer (:mod:`leanopt.precision`, ``docs/algorithms.md`` §8).
    """

    _checks = {**AlphaAdam._checks, **_PMA_CHECKS}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        period: int = 4,
        variant: str = "paper",
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
        self._extra_defaults = dict(period=period, variant=variant)
        super().__init__(params, lr, betas, eps, weight_decay, mask=mask, alpha=alpha, count_scale=count_scale,
                         maximize=maximize, fused=fused, skip_nonfinite=skip_nonfinite,
                         state_precision=state_precision, state_block_size=state_block_size, state_min_size=state_min_size, stochastic_rounding=stochastic_rounding)

    def _coeffs(self, group: dict[str, Any], lr: float, step: float) -> AdamStep:
        return adamw_pma_step(lr, *group["betas"], int(step), group["period"], group["variant"], eps=group["eps"],
                              weight_decay=group["weight_decay"], maximize=group["maximize"])


class LionPMA(Lion):
    """Lion-PMA (the PMA paper, Algorithm 2): Lion with the periodic moving average.
    Call ``step()`` after every micro-batch; the update is in the module docstring.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: learning rate of the large steps (small steps use ``lr/period``). Default 1e-4.
        betas: ``(β1, β2)``. Default (0.95, 0.98), the paper's.
        weight_decay: decoupled weight decay. Default 0.
        period: K, the micro-batches per period. Default 4.
        variant: ``"paper"`` (default) or ``"released"`` (small steps decay with the full lr).
        mask, alpha, count_scale: the AlphaAdam mask component; default ``mask="none"``.
        maximize: maximize the objective instead of minimizing it. Default False.
        fused: the backend, as :class:`AlphaAdam`. Default None (the fastest).
        skip_nonfinite: skip the step of a parameter whose gradient holds a NaN or an
            Inf (state untouched) and count it in ``nonfinite_skips``; without it, the
            non-finite value reaches that element only (``docs/algorithms.md`` §0). Default False.
        state_precision, state_block_size, state_min_size, stochastic_rounding: how the
            state is stored (``"param"``, ``"bf16"``, ``"int8"``, ``"int4"``) and whether
            bfloat16 parameters are rounded stochastically; the same on every leanopt
            optimizer (:mod:`leanopt.precision`, ``docs/algorithms.md`` §8).
    """

    _checks = {**Lion._checks, **_PMA_CHECKS}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.95, 0.98),
        weight_decay: float = 0.0,
        *,
        period: int = 4,
        variant: str = "paper",
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
        self._extra_defaults = dict(period=period, variant=variant)
        super().__init__(params, lr, betas, weight_decay, mask=mask, alpha=alpha, count_scale=count_scale,
                         maximize=maximize, fused=fused, skip_nonfinite=skip_nonfinite,
                         state_precision=state_precision, state_block_size=state_block_size, state_min_size=state_min_size, stochastic_rounding=stochastic_rounding)

    def _coeffs(self, group: dict[str, Any], lr: float, step: float) -> LionStep:
        return lion_pma_step(lr, *group["betas"], int(step), group["period"], group["variant"],
                             weight_decay=group["weight_decay"], maximize=group["maximize"])
