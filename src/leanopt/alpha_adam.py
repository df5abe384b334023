"""AlphaAdam and cautious AdamW (C-AdamW): AdamW with an intra-layer update mask.

Paper: Chang, Yuan & Li, "AlphaAdam: Asynchronous Masked Optimization with Dynamic Alpha
for Selective Updates", arXiv:2501.18094 (Algorithm 1). C-AdamW: Liang et al.,
"Cautious Optimizers: Improving Training with One Line of Code", arXiv:2411.16085 (the
AlphaAdam paper's "CAdam" baseline). The math: ``docs/algorithms.md`` §4.

Per parameter tensor::

    m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
    u = (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)
    p ← p·(1 − lr·wd) ;  p ← p − η̂·α·(φ⊙u)       (φ, α, η̂: :mod:`leanopt.mask`)

The functional core :func:`alpha_adam` takes per-parameter step coefficients
(:class:`AdamStep`), so that AdamW-PMA (:mod:`leanopt.pma`) runs the same code with its
period-dependent moment weights, learning rates and bias corrections.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _native
from ._backend import Backends, every_row
from ._compile import field_index, fusable_groups, hyper
from .precision import CompactKernel, flat, precision_defaults
from ._optimizer import (BOOL, BOOL_OR_NONE, NONNEG, Betas, LeanOptimizer, ParamsT, bias_corrections, decay_, decay_factor,
                         direction, scalar, step_tensor)
from ._distributed import Piece
from .mask import (agreement, mask_active, unmasked, mask_checks, mask_defaults, masked_update_, native_two_pass, step_,
                   two_pass, whole_sizes)

__all__ = ["AdamStep", "AdamW", "AlphaAdam", "CAdamW", "adam_step", "alpha_adam"]


class AdamStep(NamedTuple):
    """The scalars of one Adam-family step for one parameter, in the order of the C
    kernel's row (``AD_*`` of ``csrc/cpu_kernels.c``; a test keeps the two equal)::

        g ← sign·g
        m ← m_keep·m + m_gain·g   (m.lerp_(g, m_gain) where lerp: m_keep + m_gain = 1)
        v ← v_keep·v + v_gain·g²
        u = (m / m_div) / (sqrt(v) / v_div + eps)
        p ← decay·p ;  p ← p − lr·u     (or the masked step of :mod:`leanopt.mask`)
        m, v ← rescale·m, rescale·v
    """

    sign: float
    m_keep: float
    m_gain: float
    lerp: float
    v_keep: float
    v_gain: float
    v_div: float
    eps: float
    m_div: float
    decay: float
    lr: float
    rescale: float = 1.0


_F = field_index(AdamStep)  # the compiled kernel's column of each field


def adam_step(lr: float, beta1: float, beta2: float, step: float, *, eps: float, weight_decay: float, maximize: bool,
              m_keep: float | None = None, m_gain: float | None = None, v_keep: float | None = None,
              v_gain: float | None = None, m_div: float | None = None, v_div: float | None = None,
              rescale: float = 1.0) -> AdamStep:
    """AdamW's coefficients at ``step`` (as ``torch.optim.AdamW``); a variant (AdamW-PMA)
    passes its own moment weights and bias corrections in place of AdamW's."""
    if m_div is None or v_div is None:  # a variant that brings both needs no AdamW corrections
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, step)
        m_div = bc1 if m_div is None else m_div
        v_div = bc2_sqrt if v_div is None else v_div
    m_keep = beta1 if m_keep is None else m_keep
    m_gain = 1 - beta1 if m_gain is None else m_gain
    return AdamStep(direction(maximize), m_keep, m_gain, float(m_keep + m_gain == 1), beta2 if v_keep is None else v_keep,
                    1 - beta2 if v_gain is None else v_gain, v_div, eps, m_div, decay_factor(lr, weight_decay), lr, rescale)


def alpha_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               coeffs: list[AdamStep], *, mask: str, alpha: str, count_scale: bool,
               pieces: list[Piece | None] | None = None) -> None:
    """Functional AlphaAdam step over lists of tensors (per-tensor reference path).

    With ``mask="none"`` and ``count_scale=False`` this is AdamW, operation for operation.
    ``pieces``: of sharded tensors, which part each tensor is (:mod:`leanopt._backend`).
    """
    masked = mask_active(mask, count_scale)
    for p, g, m, v, c, piece in zip(params, grads, exp_avgs, exp_avg_sqs, coeffs, pieces or [None] * len(params), strict=True):
        if c.sign < 0:
            g = -g
        phi = agreement(g, m) if mask == "async" else None  # m is still m_{t-1}
        if c.lerp:
            m.lerp_(g, c.m_gain)
        else:
            m.mul_(c.m_keep).add_(g, alpha=c.m_gain)
        v.mul_(c.v_keep).addcmul_(g, g, value=c.v_gain)
        if mask == "sync":
            phi = agreement(g, m)
        decay_(p, c.decay)
        denom = v.sqrt().div_(c.v_div).add_(c.eps)
        if masked:
            masked_update_(p, m.div(denom).div_(c.m_div), phi, c.lr, alpha=alpha, count_scale=count_scale, piece=piece)
        else:
            p.addcdiv_(m, denom, value=-(c.lr / c.m_div))
        if c.rescale != 1:
            m.mul_(c.rescale)
            v.mul_(c.rescale)


def _adam_kernel(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], H: Tensor, sums: Tensor | None,
                 phase: str, mask: str, alpha: str, count_scale: bool, whole: Tensor | None = None) -> Tensor | None:
    # H: one AdamStep per row. One pass per tensor reading p, g, m, v and writing them (plus
    # the sums pass with the mask)
    out = []
    for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        h = H[i]
        g = g * h[_F.sign]
        m_new = m * h[_F.m_keep] + g * h[_F.m_gain]
        v_new = v * h[_F.v_keep] + g * g * h[_F.v_gain]
        # one division per element (the step is compute-heavy): the divisors' reciprocals are scalars
        u = m_new / (v_new.sqrt() * (1 / h[_F.v_div]) + h[_F.eps]) * (1 / h[_F.m_div])
        part = step_(p, u, h[_F.decay], h[_F.lr], g, m, m_new, None if sums is None else sums[i], phase=phase, mask=mask,
                     alpha=alpha, count_scale=count_scale, numel=None if whole is None else whole[i])
        if part is not None:  # the sums call writes nothing
            out.append(part)
            continue
        m.copy_(m_new * h[_F.rescale])
        v.copy_(v_new * h[_F.rescale])
    return torch.stack(out) if out else None


_KERNEL = CompactKernel(_adam_kernel)  # compact state: decoded and encoded in the kernel's passes


def _alpha_adam_compiled(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                         coeffs: list[AdamStep], *, mask: str, alpha: str, count_scale: bool,
                         pieces: list[Piece | None] | None = None) -> None:
    """The step by compiled kernels (:mod:`leanopt._compile`), a few tensors per call;
    ``pieces``: of shards (:func:`leanopt.mask.two_pass`)."""
    calls = [(idx, tuple([flat(x[i], params[i]) for i in idx] for x in (params, grads, exp_avgs, exp_avg_sqs)),
              hyper([coeffs[i] for i in idx], params[idx[0]])) for idx in fusable_groups(params)]
    two_pass(_KERNEL, calls, params, pieces, mask=mask, alpha=alpha, count_scale=count_scale)


def _alpha_adam_native(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                       coeffs: list[AdamStep], *, mask: str, alpha: str, count_scale: bool) -> None:
    """The step by the C kernel (:mod:`leanopt._native`), every tensor in one call."""
    coeffs = _kernel_coeffs(params, None, coeffs, mask, count_scale)
    _native.adam(params, grads, exp_avgs, exp_avg_sqs, coeffs, mask=mask, alpha=alpha, count_scale=count_scale)


def _alpha_adam_sharded(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                        coeffs: list[AdamStep], *, mask: str, alpha: str, count_scale: bool,
                        pieces: list[Piece | None]) -> None:
    """The masked step of shards by the C kernel: pass 1 over every local tensor (m, v and
    the mask sums), the sums over the ranks, pass 2 from them and each tensor's whole size.
    Without a mask (the count scale alone) one pass, its n/(n+1) of the whole tensor."""
    coeffs = _kernel_coeffs(params, pieces, coeffs, mask, count_scale)
    native_two_pass(_native.adam, [params, grads, exp_avgs, exp_avg_sqs, coeffs], pieces, mask=mask, alpha=alpha,
                    count_scale=count_scale)


def _kernel_coeffs(params: list[Tensor], pieces: list[Piece | None] | None, coeffs: list[AdamStep], mask: str,
                   count_scale: bool) -> list[AdamStep]:
    """The step records as the C kernels take them: without a mask (φ ≡ 1) the count scale
    n/(n+1) (n: each tensor's whole size, a shard's from ``pieces``) is a constant of the
    step, folded into lr."""
    if mask == "none" and count_scale:
        return [c._replace(lr=c.lr * (n / (n + 1))) for n, c in zip(whole_sizes(params, pieces), coeffs)]
    return coeffs


def _alpha_adam_compact(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Any], exp_avg_sqs: list[Any],
                        coeffs: list[AdamStep], *, mask: str, alpha: str, count_scale: bool) -> None:
    """The step over int8/int4 state (:func:`leanopt._native.compact_step`): one pass per
    tensor, two with the mask (its sums, then the step)."""
    for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, _kernel_coeffs(params, None, coeffs, mask, count_scale)):
        _native.compact_step("adam", p, g, m, v, c, scaled=count_scale, mask=mask, alpha=alpha, count_scale=count_scale)


BACKENDS = Backends(streams=4, eager=alpha_adam, compiled=_alpha_adam_compiled, compiled_shards=every_row,
                    native=_alpha_adam_native, elementwise=unmasked, compact=_alpha_adam_compact, compact_takes=every_row,
                    sharded=_alpha_adam_sharded, compiled_compact=True)


class AlphaAdam(LeanOptimizer):
    """AlphaAdam (arXiv:2501.18094): AdamW that updates, per tensor, only the coordinates
    whose gradient agrees in sign with the previous momentum, compensating the lost
    magnitude with α and a count scale. State: as AdamW (``exp_avg``, ``exp_avg_sq``).

    Readings of the paper (``docs/algorithms.md`` §4): Algorithm 1 prints no bias correction
    and ``sqrt(v + eps)``; we use AdamW's bias correction and ``sqrt(v̂) + eps``, so that
    ``mask="none", alpha="none", count_scale=False`` is exactly ``torch.optim.AdamW``. The
    mask uses strict agreement, ``g·m > 0`` (Algorithm 1), not the ``≥`` of Eqs. 5-6; when
    it selects nothing (always at t = 1, where m_0 = 0) φ falls back to all ones and the
    formulas apply literally (α = 1, η̂ = lr·n/(n+1)).

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: learning rate. Default 1e-3.
        betas: ``(β1, β2)``, each in [0, 1). Default (0.9, 0.999).
        eps: added to ``sqrt(v̂)``. Default 1e-8.
        weight_decay: decoupled weight decay. Default 1e-2 (as ``torch.optim.AdamW``).
        mask: ``"async"`` (default: φ from ``g ⊙ m_{t−1}``), ``"sync"`` (``g ⊙ m_t``) or ``"none"``.
        alpha: ``"squared"`` (default, Algorithm 1: ``||u||²/||φ⊙u||²``), ``"root"`` (Eq. 9) or ``"none"``.
        count_scale: scale the step by ``n/(||φ||₀+1)`` (Algorithm 1). Default True.
        maximize: maximize the objective instead of minimizing it. Default False.
        fused: which backend runs the step (:mod:`leanopt._backend`). ``None`` (default):
            the fastest correct one for each tensor -- the C kernels (:mod:`leanopt._native`,
            built once per machine in seconds) for float32 and bfloat16 CPU tensors, the
            ``torch.compile``d kernels on CUDA (the first step compiles), the eager
            reference elsewhere (float64, DTensor shards); one pass over memory per tensor
            without a mask, two with one. ``True``: a fast kernel for every tensor, an
            error naming a tensor none takes. ``False``: the eager reference.
        skip_nonfinite: skip the step of a parameter whose gradient holds a NaN or an
            Inf (state untouched) and count it in ``nonfinite_skips``; without it, the
            non-finite value reaches that element only (``docs/algorithms.md`` §0). Default False.
        state_precision, state_block_size, state_min_size, stochastic_rounding: how the
            state is stored (``"param"``, ``"bf16"``, ``"int8"``, ``"int4"``) and whether
            bfloat16 parameters are rounded stochastically; the same on every leanopt
            optimizer (:mod:`leanopt.precision`, ``docs/algorithms.md`` §8).
    """

    _checks = {"lr": NONNEG, "betas": Betas(), "eps": NONNEG, "weight_decay": NONNEG, "maximize": BOOL, "fused": BOOL_OR_NONE,
               **mask_checks()}
    _state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        mask: str = "async",
        alpha: str | None = "squared",
        count_scale: bool | None = True,
        maximize: bool = False,
        fused: bool | None = None,
        skip_nonfinite: bool = False,
        state_precision: str | dict[str, str] = "param",
        state_block_size: int = 256,
        state_min_size: int = 4096,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, fused=fused,
                        skip_nonfinite=skip_nonfinite, **mask_defaults(mask, alpha, count_scale),
                        **precision_defaults(state_precision, state_block_size, state_min_size, stochastic_rounding), **self._extra_defaults)
        super().__init__(params, defaults)

    def _coeffs(self, group: dict[str, Any], lr: float, step: float) -> AdamStep:
        return adam_step(lr, *group["betas"], step, eps=group["eps"], weight_decay=group["weight_decay"],
                         maximize=group["maximize"])

    def _update(self) -> None:
        for group in self.param_groups:
            params, grads = self._grads(group)
            if not params:
                continue
            exp_avgs, exp_avg_sqs, coeffs = [], [], []
            lr = scalar(group["lr"])  # once per group: a tensor lr is read (synced) once
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = step_tensor()
                state["step"] += 1
                exp_avgs.append(self._element_state(group, p, "exp_avg"))
                exp_avg_sqs.append(self._element_state(group, p, "exp_avg_sq"))
                coeffs.append(self._coeffs(group, lr, state["step"].item()))
            self._route(BACKENDS, group, params, grads, exp_avgs, exp_avg_sqs, coeffs, mask=group["mask"],
                        alpha=group["alpha"], count_scale=group["count_scale"])


class CAdamW(AlphaAdam):
    """Cautious AdamW (Liang et al. 2024, arXiv:2411.16085; AlphaAdam's "CAdam" baseline):
    AlphaAdam with the *synchronous* mask ``g ⊙ m_t > 0``, no α, and the count scale
    ``n/(||φ||₀+1)`` (``docs/algorithms.md`` §4). Arguments as :class:`AlphaAdam`, without the
    mask ones."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        fused: bool | None = None,
        skip_nonfinite: bool = False,
        state_precision: str | dict[str, str] = "param",
        state_block_size: int = 256,
        state_min_size: int = 4096,
        stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, mask="sync", alpha="none", count_scale=True, maximize=maximize,
                         fused=fused, skip_nonfinite=skip_nonfinite, state_precision=state_precision,
                         state_block_size=state_block_size, state_min_size=state_min_size,
                         stochastic_rounding=stochastic_rounding)


class AdamW(AlphaAdam):
    """AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101), the same update as
    ``torch.optim.AdamW`` (``docs/algorithms.md`` §4 and §7): AlphaAdam with the mask off,
    no α and no count scale. It exists for what torch's AdamW lacks -- compact state
    (``state_precision="int8"`` …) and stochastic rounding of bfloat16 parameters, §8 --
    and is what ``create_optimizer("adamw", …)`` builds when one of those is asked for.
    Arguments as :class:`AlphaAdam`, without the mask ones."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        fused: bool | None = None,
        skip_nonfinite: bool = False,
        state_precision: str | dict[str, str] = "param",
        state_block_size: int = 256,
        state_min_size: int = 4096,
        stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, mask="none", alpha="none", count_scale=False, maximize=maximize,
                         fused=fused, skip_nonfinite=skip_nonfinite, state_precision=state_precision,
                         state_block_size=state_block_size, state_min_size=state_min_size,
                         stochastic_rounding=stochastic_rounding)
