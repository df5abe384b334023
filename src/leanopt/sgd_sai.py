"""SGD-SaI: SGD with momentum and learning rates scaled at initialization by g-SNR.

Paper: Xu et al., "No More Adam: Learning Rate Scaling at Initialization is All You
Need", arXiv:2412.11768 (Algorithm 1, Sec. 4.1). The math: ``docs/algorithms.md`` §3.

Each parameter tensor is one block. At the first step in which a block has a gradient::

    G_norm = ||g||₂ ;  G_var = mean((g − mean g)²) ;  snr = G_norm / sqrt(G_var + eps)
    m ← g

later ``m ← μ·m + (1−μ)·g``; every step ``p ← p·(1 − lr·wd)``, ``p ← p − lr·scale·m``,
where ``scale = snr / max_k snr_k`` (``variant="paper"``) or the released package's
``||g|| / (std_unbiased(g) + eps)`` (``variant="released"``). The scale is computed once
and then kept as optimizer state.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _native
from ._backend import Backends, every_row
from ._compile import field_index, fusable_groups, hyper
from .precision import CompactKernel, flat, precision_defaults
from ._optimizer import (BOOL, BOOL_OR_NONE, NONNEG, Interval, LeanOptimizer, OneOf, ParamsT, acc_dtype, decay_, decay_factor,
                         decoupled_decay_, direction, finite_terms, scalar)
from ._distributed import Piece, all_reduce_sums, local, piece_of
from .mask import agreement, mask_active, unmasked, mask_checks, mask_defaults, masked_update_, native_two_pass, step_, two_pass

__all__ = ["SGDSaI", "SGDStep", "sgd_sai", "sgd_step", "gsnr"]


class SGDStep(NamedTuple):
    """The scalars of one SGD-SaI step for one parameter, in the order of the C kernel's
    row (``SG_*`` of ``csrc/cpu_kernels.c``)::

        g ← sign·g ;  m ← keep·m + gain·g   (not for a fresh buffer, which already is g)
        p ← decay·p ;  p ← p − lr·scale·m    (m is g where has_m = 0: no momentum)

    ``scale`` is the parameter's state tensor; the C kernel takes its value in the record
    (filled in by its adapter), the other paths read the tensor."""

    sign: float
    keep: float
    gain: float
    fresh: float
    has_m: float
    decay: float
    lr: float
    scale: float = float("nan")


_F = field_index(SGDStep)


def sgd_step(lr: float, momentum: float, *, fresh: bool, has_m: bool, weight_decay: float, maximize: bool) -> SGDStep:
    """SGD-SaI's coefficients for one parameter (a fresh buffer keeps its value: ``m = g``)."""
    keep, gain = (1.0, 0.0) if fresh else (momentum, 1 - momentum)
    return SGDStep(direction(maximize), keep, gain, float(fresh), float(has_m), decay_factor(lr, weight_decay), lr)


def sgd_sai(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], scales: list[Tensor],
            coeffs: list[SGDStep], *, mask: str = "none", alpha: str = "none", count_scale: bool = False,
            pieces: list[Piece | None] | None = None) -> None:
    """Functional SGD-SaI step over lists of tensors.

    ``momentum_buffers[i]`` is None when ``momentum == 0``. ``mask``, ``alpha``,
    ``count_scale``: the AlphaAdam component (:mod:`leanopt.mask`) with ``u = scale·m``;
    a fresh buffer's ``m_{t−1}`` is zero (so the async mask falls back to all ones at the
    first step). ``pieces``: of sharded tensors, which part each tensor is (:mod:`leanopt._backend`).
    """
    masked = mask_active(mask, count_scale)
    for p, g, buf, scale, c, piece in zip(params, grads, momentum_buffers, scales, coeffs, pieces or [None] * len(params),
                                          strict=True):
        if c.sign < 0:
            g = -g
        phi = agreement(g, buf) if mask == "async" and not c.fresh else None
        if buf is not None and not c.fresh:
            buf.mul_(c.keep).add_(g, alpha=c.gain)
        m = g if buf is None else buf
        if mask == "sync":
            phi = agreement(g, m)
        decay_(p, c.decay)
        if masked:
            masked_update_(p, m * scale, phi, c.lr, alpha=alpha, count_scale=count_scale, piece=piece)
        else:
            p.addcmul_(m, scale, value=-c.lr)


def _sgd_sai_kernel(ps: list[Tensor], gs: list[Tensor], bufs: list[Tensor] | None, scales: list[Tensor], H: Tensor,
                    sums: Tensor | None, phase: str, mask: str, alpha: str, count_scale: bool,
                    whole: Tensor | None = None) -> Tensor | None:
    # H: one SGDStep per row; one pass reading p, g, m and writing p, m (plus the sums pass
    # with the mask). A fresh buffer's m_{t-1} is zero.
    out = []
    for i, (p, g, scale) in enumerate(zip(ps, gs, scales)):
        h = H[i]
        g = g * h[_F.sign]
        m = None if bufs is None else bufs[i]  # momentum = 0: the direction is g
        m_new = g if m is None else m * h[_F.keep] + g * h[_F.gain]
        m_prev = None if m is None else m * (1 - h[_F.fresh])
        part = step_(p, m_new * scale, h[_F.decay], h[_F.lr], g, m_prev, m_new, None if sums is None else sums[i],
                     phase=phase, mask=mask, alpha=alpha, count_scale=count_scale, numel=None if whole is None else whole[i])
        if part is not None:  # the sums call writes nothing
            out.append(part)
            continue
        if m is not None:
            m.copy_(m_new)
    return torch.stack(out) if out else None


_KERNEL = CompactKernel(_sgd_sai_kernel)  # compact state: decoded and encoded in the kernel's passes


def _sgd_sai_compiled(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], scales: list[Tensor],
                      coeffs: list[SGDStep], *, mask: str, alpha: str, count_scale: bool,
                      pieces: list[Piece | None] | None = None) -> None:
    calls = []
    for idx in fusable_groups(params, key=lambda i: momentum_buffers[i] is None):
        bufs = None if momentum_buffers[idx[0]] is None else [flat(momentum_buffers[i], params[i]) for i in idx]
        calls.append((idx, ([params[i].view(-1) for i in idx], [grads[i].view(-1) for i in idx], bufs,
                            [scales[i] for i in idx]), hyper([coeffs[i] for i in idx], params[idx[0]])))
    two_pass(_KERNEL, calls, params, pieces, mask=mask, alpha=alpha, count_scale=count_scale)


def _sgd_sai_native(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], scales: list[Tensor],
                    coeffs: list[SGDStep], *, mask: str, alpha: str, count_scale: bool,
                    pieces: list[Piece | None] | None = None) -> None:
    """The step by the C kernels: one pass, two with the mask (buffers only; its sums over
    the ranks between them for shards: ``pieces``)."""
    if not mask_active(mask, count_scale):
        _native.sgd_sai(params, grads, momentum_buffers, _with_scales(coeffs, scales))
        return
    native_two_pass(functools.partial(_native.elementwise_masked, "sgd_sai"),
                    [params, grads, momentum_buffers, _with_scales(coeffs, scales)], pieces, mask=mask, alpha=alpha,
                    count_scale=count_scale)


def _native_takes(row: list[Any], options: dict[str, Any]) -> bool:
    # the masked kernel keeps no momentum-free form (momentum=0: m is g, the compiled/eager paths)
    return unmasked(options) or row[2] is not None


def _with_scales(coeffs: list[SGDStep], scales: list[Tensor]) -> list[SGDStep]:
    """The step records with each tensor's scale, as the C kernels take them (one read of every scale)."""
    return [c._replace(scale=s) for c, s in zip(coeffs, torch.stack(scales).tolist())]


def _sgd_sai_compact(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Any], scales: list[Tensor],
                     coeffs: list[SGDStep], *, mask: str, alpha: str, count_scale: bool) -> None:
    for p, g, m, c in zip(params, grads, momentum_buffers, _with_scales(coeffs, scales)):  # compact momenta: one
        _native.compact_step("sgd_sai", p, g, m, None, c, mask=mask, alpha=alpha, count_scale=count_scale)  # pass, two masked


BACKENDS = Backends(streams=4, eager=sgd_sai, compiled=_sgd_sai_compiled, compiled_shards=every_row, native=_sgd_sai_native,
                    native_takes=_native_takes, elementwise=unmasked, compact=_sgd_sai_compact, compact_takes=_native_takes,
                    sharded=_sgd_sai_native, sharded_takes=_native_takes, compiled_compact=True)


def gsnr(g: Tensor, eps: float, variant: str) -> tuple[Tensor, bool]:
    """g-SNR of one block's gradient, and whether the block is degenerate for ``"paper"``
    (all elements equal, so its variance carries no noise information)."""
    acc = acc_dtype(g)
    x = finite_terms(g.detach().to(acc).reshape(-1))  # a NaN element must not reach every scale (via the max)
    norm = torch.linalg.vector_norm(x)
    if variant == "released":
        # sgd-sai 1.0.3: unbiased std, whose NaN for a single element is taken as 0; eps outside
        std = x.std() if x.numel() > 1 else torch.zeros((), dtype=acc, device=x.device)
        return norm / (std + eps), False
    var = x.var(correction=0)
    # a meta tensor (state planned without weights: bench/memory.py) has no values to compare
    degenerate = x.numel() < 2 or (not x.is_meta and bool((x.amax() == x.amin()).item()))
    return norm / torch.sqrt(var + eps), degenerate


def gsnr_sharded(parts: list[tuple[Tensor, Piece, float, str]]) -> list[tuple[Tensor, bool, bool]]:
    """:func:`gsnr` of sharded gradients ``(local part, piece, eps, variant)``, and whether
    each is zero: the same statistics from every rank's partial sums (the variance in two
    passes, as ``torch.var``), in three collectives per process group for the whole list."""
    if not parts:
        return []
    xs = [finite_terms(g.detach().to(acc_dtype(g)).reshape(-1)) for g, _, _, _ in parts]
    groups = [piece.groups for _, piece, _, _ in parts]
    sums = [torch.stack([x.sum(), x.square().sum()]) for x in xs]
    empty = [torch.tensor(-math.inf, dtype=x.dtype, device=x.device) for x in xs]
    extremes = [torch.stack([x.amax() if x.numel() else e, -x.amin() if x.numel() else e, (g != 0).any().to(x.dtype)])
                for x, e, (g, _, _, _) in zip(xs, empty, parts)]
    all_reduce_sums(sums, groups)
    all_reduce_sums(extremes, groups, op="max")
    n = [piece.numel for _, piece, _, _ in parts]
    spread = [(x - s[0] / k).square().sum().reshape(1) for x, s, k in zip(xs, sums, n)]
    all_reduce_sums(spread, groups)
    out = []
    for (_, _, eps, variant), s, e, d, k in zip(parts, sums, extremes, spread, n):
        norm, zero = s[1].sqrt(), not bool(e[2])
        if variant == "released":
            std = (d[0] / (k - 1)).sqrt() if k > 1 else torch.zeros_like(norm)
            out.append((norm / (std + eps), False, zero))
        else:
            out.append((norm / torch.sqrt(d[0] / k + eps), k < 2 or bool(e[0] == -e[1]), zero))
    return out


def _started(state: dict[str, Any]) -> bool:
    # "started" is absent from states saved before it existed: those had a scale only once started
    return "scale" in state and state.get("started", True)


class SGDSaI(LeanOptimizer):
    """SGD-SaI (arXiv:2412.11768): momentum SGD, per-tensor lr scaled by first-step g-SNR.

    The state is one momentum buffer per parameter (none with ``momentum=0``) and one
    scalar ``scale`` per tensor — half of AdamW's.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: learning rate (read at every step, so schedulers work). Default 1e-2.
        momentum: μ in [0, 1); ``momentum=0`` is plain SGD with the scale. Default 0.9.
        eps: added to the variance (``"paper"``) or the std (``"released"``). Default 1e-8.
        weight_decay: decoupled weight decay, applied to every parameter. Default 1e-2.
        variant: ``"paper"`` (default) or ``"released"`` (see below).
        mask, alpha, count_scale: the AlphaAdam mask component (:mod:`leanopt.mask`) with
            ``u = scale·m``; default ``mask="none"``. ``mask="async"`` needs momentum > 0
            (without momentum there is no previous first moment).
        fused: which backend runs the step, as :class:`leanopt.AlphaAdam` (the C kernel
            takes unmasked steps; masked ones on the CPU take the eager path by default).
            Default None (the fastest).
        maximize: maximize the objective instead of minimizing it. Default False.
        skip_nonfinite: skip the step of a parameter whose gradient holds a NaN or an
            Inf (state untouched) and count it in ``nonfinite_skips``; without it, the
            non-finite value reaches that element only (``docs/algorithms.md`` §0). Default False.
        state_precision, state_block_size, state_min_size, stochastic_rounding: how the
            state is stored (``"param"``, ``"bf16"``, ``"int8"``, ``"int4"``) and whether
            bfloat16 parameters are rounded stochastically; the same on every leanopt
            optimizer (:mod:`leanopt.precision`, ``docs/algorithms.md`` §8).

    ``variant="paper"``: ``scale = snr / max_k snr_k`` with the biased variance of the
    paper's Sec. 4.1, so every scale lies in (0, 1]. The maximum is taken over the
    blocks (of all groups) that start at the first step and is stored; blocks whose
    first gradient comes later are scaled by that stored maximum, **clipped to 1**, so
    that no block ever steps with more than ``lr``. Degenerate blocks follow these rules:

    * a block whose first gradient is constant (every element equal, e.g. a scalar
      parameter) has zero variance, so its g-SNR is ``||g||/sqrt(eps)``, an artefact of
      eps that would dominate the maximum and freeze every other block. Such a block is
      left out of the maximum and gets ``scale = 1`` (its g-SNR is unbounded: the clip).
    * a block whose gradient is exactly zero everywhere (e.g. LoRA's ``lora_A`` while
      ``lora_B`` is still zero) has no g-SNR yet: it only receives weight decay, and its
      scale and momentum start at its first non-zero gradient.
    * if no block at the first step has a usable g-SNR, the maximum is fixed at the
      first step at which one does.

    ``variant="released"``: the math of the released ``sgd-sai`` 1.0.3 for exact
    comparison: ``scale = ||g|| / (std_unbiased(g) + eps)`` with a NaN std taken as 0, no
    normalization (an all-zero first gradient therefore gets scale 0, as there). Its bugs
    are not reproduced: late gradients work, ``momentum=0`` works, the scale survives
    ``state_dict`` round trips, and the closure is evaluated once.

    State per parameter: ``scale`` (0-d, never recomputed after a resume),
    ``momentum_buffer`` (if ``momentum > 0``) and, for ``"paper"``, ``snr_max``, the
    stored maximum used to scale blocks that start late. A block that has not started yet
    holds placeholders (``started=False``, NaN scale, zero momentum), so that its state has
    the same entries before and after it starts. Reductions run in float32
    (float64 for float64 parameters).
    """

    _state_keys = ("scale",)
    _checks = {
        "lr": NONNEG,
        "momentum": Interval(0.0, 1.0, high_open=True),
        "eps": NONNEG,
        "weight_decay": NONNEG,
        "variant": OneOf(("paper", "released")),
        "maximize": BOOL,
        "fused": BOOL_OR_NONE,
        **mask_checks(),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        momentum: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
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
        defaults = dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay, variant=variant, maximize=maximize,
                        fused=fused, skip_nonfinite=skip_nonfinite, **mask_defaults(mask, alpha, count_scale),
                        **precision_defaults(state_precision, state_block_size, state_min_size, stochastic_rounding))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["mask"] == "async" and group["momentum"] == 0:
            self.param_groups.pop()
            raise ValueError("SGDSaI: mask='async' needs momentum > 0: without momentum there is no m_{t-1} to compare with")

    # -- scale at initialization ----------------------------------------------------------
    def _stored_max(self) -> Tensor | None:
        for state in self.state.values():
            if _started(state) and "snr_max" in state:
                return state["snr_max"]
        return None

    def _placeholder(self, group: dict[str, Any], p: Tensor) -> None:
        """State entries of a block that has not started, with the shapes of a started one:
        checkpoint tools that build a template by stepping on zero gradients (DCP's
        ``get_optimizer_state_dict``) then find every entry to load into."""
        state = self.state[p]
        if "scale" in state:
            return
        state["started"] = False
        state["scale"] = torch.full((), float("nan"), dtype=p.dtype, device=p.device)
        if group["variant"] == "paper":
            state["snr_max"] = torch.full((), float("nan"), dtype=p.dtype, device=p.device)
        if group["momentum"] != 0:
            self._element_state(group, p, "momentum_buffer", torch.contiguous_format)

    def _initialize(self, pending: list[tuple[dict[str, Any], Tensor, Tensor]]) -> list[Tensor]:
        """Compute the scales of the blocks that have no scale yet; returns those started."""
        stats, sharded = [], []
        for group, p, g in pending:
            g = -g if group["maximize"] else g  # the first momentum is the (signed) gradient
            piece = piece_of(p, self.param_name(p))
            if piece is not None and piece.groups:
                sharded.append((len(stats), (g.to_local(), piece, group["eps"], group["variant"])))
                stats.append((group, p, g, None, False, False))
                continue
            g_local = local(g)
            snr, degenerate = gsnr(g_local, group["eps"], group["variant"])
            zero = not g_local.is_meta and not bool(g_local.any())
            stats.append((group, p, g, snr, degenerate, zero))
        for (i, _), result in zip(sharded, gsnr_sharded([part for _, part in sharded])):
            stats[i] = (*stats[i][:3], *result)

        snr_max = self._stored_max()
        if snr_max is None:
            usable = [snr for group, _, _, snr, deg, zero in stats if group["variant"] == "paper" and not deg and not zero]
            if usable:
                snr_max = torch.stack([s.to(torch.float64) for s in usable]).max()

        started = []
        for group, p, g, snr, degenerate, zero in stats:
            if group["variant"] == "paper":
                if zero or (snr_max is None and not degenerate):
                    continue  # no g-SNR yet: weight decay only (see class docstring)
                if degenerate:
                    scale = torch.ones((), dtype=torch.float64)
                else:
                    scale = (snr.to(torch.float64) / snr_max).clamp(max=1.0)
            else:
                scale = snr
            state = self.state[p]
            state["started"] = True
            state["scale"] = scale.to(dtype=p.dtype, device=p.device)
            if group["variant"] == "paper" and snr_max is not None:
                state["snr_max"] = snr_max.to(dtype=p.dtype, device=p.device)
            if group["momentum"] != 0:
                self._set_element_state(group, p, "momentum_buffer", g)
            started.append(p)
        return started

    # -- step -----------------------------------------------------------------------------
    def _update(self) -> None:
        per_group = [(group, *self._grads(group)) for group in self.param_groups]
        pending = [(group, p, g) for group, params, grads in per_group for p, g in zip(params, grads) if not _started(self.state[p])]
        started = set(self._initialize(pending)) if pending else set()

        for group, params, grads in per_group:
            todo = [(p, g) for p, g in zip(params, grads) if _started(self.state[p])]
            waiting = [p for p, g in zip(params, grads) if not _started(self.state[p])]
            lr, wd = scalar(group["lr"]), group["weight_decay"]
            for p in waiting:
                self._placeholder(group, p)
                decoupled_decay_(p, lr, wd)
            if not todo:
                continue
            ps = [p for p, _ in todo]
            bufs = []
            for p in ps:  # (momentum switched on after the scales were fixed starts from zero)
                bufs.append(self._element_state(group, p, "momentum_buffer", torch.contiguous_format)
                            if group["momentum"] != 0 else None)
            coeffs = [sgd_step(lr, group["momentum"], fresh=p in started, has_m=buf is not None, weight_decay=wd,
                               maximize=group["maximize"]) for p, buf in zip(ps, bufs)]
            self._route(BACKENDS, group, ps, [g for _, g in todo], bufs, [self.state[p]["scale"] for p in ps], coeffs,
                        mask=group["mask"], alpha=group["alpha"], count_scale=group["count_scale"])
