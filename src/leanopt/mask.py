"""AlphaAdam's intra-layer mask and α compensation, as a component of any momentum optimizer.

Paper: Chang, Yuan & Li, "AlphaAdam: Asynchronous Masked Optimization with Dynamic Alpha
for Selective Updates", arXiv:2501.18094 (Algorithm 1, Eqs. 5, 6, 9). The math:
``docs/algorithms.md`` §4. The paper states the mechanism applies to most momentum-based
optimizers; here it is one piece of code that AlphaAdam, C-AdamW, Adam-mini, SGD-SaI,
Lion and the PMA optimizers all call, with ``u`` their own update direction and ``m``
their own first moment. Per parameter tensor of ``n`` elements::

    d  = g ⊙ m_{t−1}   (mask="async", Eq. 6)      d = g ⊙ m_t   (mask="sync", Eq. 5)
    φ  = 1[d > 0]                                  (mask="none": φ = 1)
    if sum(φ⊙u⊙u) == 0: φ = 1                      (nothing selected, e.g. t = 1 with m_0 = 0)
    α  = ||u||² / ||φ⊙u||²                         (alpha="squared"; "root": its square root; "none": 1)
    η̂  = lr · n / (||φ||₀ + 1)                     (count_scale=True; False: η̂ = lr)
    p ← p − η̂ · α · (φ⊙u)

The weight decay is the optimizer's own, applied before. When the mask is off
(``mask="none"``, ``count_scale=False``) the component is skipped entirely, so each
optimizer's default path is untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._distributed import Piece, all_reduce_sums, reduce_later
from ._optimizer import BOOL, OneOf, acc_dtype, finite_terms

__all__ = ["MASKS", "ALPHAS", "mask_checks", "mask_defaults", "mask_active", "agreement", "masked_update_", "mask_sums",
           "apply_mask_", "phi_of", "needs_sums", "step_", "two_pass", "native_two_pass", "whole_sizes"]

MASKS = ("none", "async", "sync")
ALPHAS = ("squared", "root", "none")


def mask_checks() -> dict[str, Any]:
    """Hyperparameter checks for the three mask arguments, to merge into ``_checks``."""
    return {"mask": OneOf(MASKS), "alpha": OneOf(ALPHAS), "count_scale": BOOL}


def mask_defaults(mask: str, alpha: str | None, count_scale: bool | None) -> dict[str, Any]:
    """Resolve ``None``: with a mask on, AlphaAdam's defaults (α "squared", count scaling);
    with ``mask="none"``, neither (so that the optimizer is exactly its unmasked self)."""
    OneOf(MASKS).check("mask", mask)
    on = mask != "none"
    return {
        "mask": mask,
        "alpha": ("squared" if on else "none") if alpha is None else alpha,
        "count_scale": on if count_scale is None else count_scale,
    }


def mask_active(mask: str, count_scale: bool) -> bool:
    """Whether the component changes the update at all (with φ ≡ 1, α is always 1)."""
    return mask != "none" or count_scale


def unmasked(options: dict[str, Any]) -> bool:
    """A step's options (``mask``, ``count_scale``) leave the component off: the step is
    elementwise (``leanopt._backend.Backends.elementwise``), any kernel takes a shard."""
    return not mask_active(options["mask"], options["count_scale"])


def agreement(g: Tensor, m: Tensor) -> Tensor:
    """φ before the fallback: where the gradient and the momentum agree in sign (d > 0)."""
    return (g * m) > 0


def mask_sums(u: Tensor, phi: Tensor) -> Tensor:
    """``[||u||², ||φ⊙u||², ||φ||₀]`` of one tensor, before the empty-mask fallback (so
    that one pass over memory computes all three), in float32 (float64 for float64).
    Elements whose ``u²`` is not finite are left out of all three (:func:`finite_terms`):
    a NaN gradient element moves its own parameter to NaN, not the whole tensor."""
    u2 = u.to(acc_dtype(u)).square()
    kept = phi & torch.isfinite(u2)
    u2 = finite_terms(u2)
    return torch.stack([u2.sum(), (u2 * kept).sum(), kept.sum(dtype=u2.dtype)])


def apply_mask_(p: Tensor, u: Tensor, phi: Tensor | None, sums: Tensor | None, lr: float | Tensor, *, alpha: str,
                count_scale: bool, numel: int | Tensor | None = None) -> None:
    """``p ← p − η̂·α·(φ⊙u)`` given :func:`mask_sums` (``phi=None``: φ ≡ 1, no sums needed).
    ``numel``: the whole tensor's size when ``p`` and ``u`` are one rank's shards.

    Branch-free, so it does not synchronize with the device (the empty-mask fallback is a
    ``where``) and it can be traced by ``torch.compile``. φ multiplies ``u``: an element
    whose ``u`` is NaN becomes NaN whether it is selected or not (``docs/algorithms.md`` §0).
    """
    n = u.numel() if numel is None else numel
    if phi is None:  # φ ≡ 1: α = 1 exactly
        selected, count, a = u, n, None
    else:
        uu, su_raw, count_raw = sums.unbind(0)
        empty = su_raw == 0
        selected = u * (phi | empty)
        su = torch.where(empty, uu, su_raw)
        count = torch.where(empty, n, count_raw)  # after the fallback φ ≡ 1 holds n ones
        # u ≡ 0 leaves nothing to compensate: α = 1 instead of 0/0
        a = torch.where(su > 0, uu / torch.where(su > 0, su, 1.0), 1.0)
    step = lr
    if a is not None and alpha != "none":
        step = step * (a.sqrt() if alpha == "root" else a)
    if count_scale:
        step = step * (n / (count + 1))
    if isinstance(step, Tensor):
        p.addcmul_(selected, step.to(p.dtype), value=-1.0)
    else:
        p.add_(selected, alpha=-step)


def masked_update_(p: Tensor, u: Tensor, phi: Tensor | None, lr: float | Tensor, *, alpha: str, count_scale: bool,
                   piece: Piece | None = None) -> None:
    """``p ← p − η̂·α·(φ⊙u)`` for one tensor; ``phi=None`` means φ ≡ 1.

    ``piece``: when ``p``, ``u`` and ``phi`` are this process's part of a sharded tensor
    (:class:`leanopt._distributed.Piece`), the whole-tensor sums need a collective: the
    update waits for the end of the optimizer step (:func:`leanopt._distributed.reduce_later`,
    holding this part of ``u``), when the sums of all such tensors cross the ranks together."""
    if piece is None or not piece.groups:
        apply_mask_(p, u, phi, None if phi is None else mask_sums(u, phi), lr, alpha=alpha, count_scale=count_scale)
    elif phi is None:  # φ ≡ 1 needs the whole tensor's size only
        apply_mask_(p, u, None, None, lr, alpha=alpha, count_scale=count_scale, numel=piece.numel)
    else:
        reduce_later(mask_sums(u, phi), piece.groups, lambda total: apply_mask_(p, u, phi, total, lr, alpha=alpha,
                                                                                count_scale=count_scale, numel=piece.numel))


# -- for the compiled steps (leanopt._compile), whose kernels make two calls when the mask
# -- is on: first the sums of every tensor, then the update, recomputed rather than stored


def phi_of(mask: str, g: Tensor, m_prev: Tensor | None, m_new: Tensor) -> Tensor | None:
    """φ before the fallback from the old (async) or new (sync) first moment."""
    return None if mask == "none" else agreement(g, m_prev if mask == "async" else m_new)


def needs_sums(mask: str) -> bool:
    """Whether the masked step needs a first pass for :func:`mask_sums`."""
    return mask != "none"


def two_pass(kernel: Callable[..., Any], calls: list[tuple[list[int], tuple[Any, ...], Tensor]], params: list[Tensor],
             pieces: list[Piece | None] | None, *, mask: str, alpha: str, count_scale: bool) -> None:
    """One optimizer step through a compiled kernel ``kernel(*tensors, H, sums, phase, mask,
    alpha, count_scale, whole)`` whose tensors go through :func:`step_`, over ``calls``
    (``(idx, tensors, H)``: the indices into ``params`` a call steps, its tensors and step
    records): with a mask, a ``"sums"`` call of each first returns every tensor's
    :func:`mask_sums`, then the ``"apply"`` calls recompute the update and write it (two
    passes, no stored full-size tensors). ``pieces``: of shards, whose sums cross the ranks
    between the two (one collective per group for all calls) and whose whole sizes
    (``whole``, as H's dtype; None for plain tensors) enter the count scale."""
    pieces = pieces or [None] * len(params)
    sizes = whole_sizes(params, pieces)
    wholes = [None if all(pieces[i] is None for i in idx) else
              torch.tensor([sizes[i] for i in idx], dtype=H.dtype, device=H.device) for idx, _, H in calls]
    sums = [kernel(*tensors, H, None, "sums", mask, alpha, count_scale, whole) if needs_sums(mask) else None
            for (_, tensors, H), whole in zip(calls, wholes)]
    groups = [() if pieces[i] is None else pieces[i].groups for idx, _, _ in calls for i in idx]
    if needs_sums(mask) and any(groups):
        all_reduce_sums([row for part in sums for row in part.unbind(0)], groups)
    for (_, tensors, H), part, whole in zip(calls, sums, wholes):
        kernel(*tensors, H, part, "apply", mask, alpha, count_scale, whole)


def whole_sizes(params: list[Tensor], pieces: list[Piece | None] | None) -> list[int]:
    """Each tensor's whole size: a shard's (``pieces``) is the sharded tensor's."""
    pieces = pieces or [None] * len(params)
    return [p.numel() if piece is None else piece.numel for p, piece in zip(params, pieces, strict=True)]


def native_two_pass(kernel: Callable[..., None], columns: list[list[Any]], pieces: list[Piece | None] | None,
                    parts: list[int] | None = None, **options: Any) -> None:
    """A masked step by a C kernel of two passes (:mod:`leanopt._native`: ``adam``,
    ``adam_mini_masked``, ``elementwise_masked``), once per dtype among the tensors:
    ``kernel(*columns, between=..., whole=..., **options)``. ``pieces``: of shards, whose
    mask sums ``between`` sums over their groups (one collective per group per call) and
    whose whole size ``whole`` gives the count scale; None: plain tensors. ``parts``: the
    tensor each entry is a part of, where entries are runs of one tensor stepped apart
    (plain tensors only): between the passes each part takes its tensor's sums, and the
    count scale its tensor's size."""
    params = columns[0]
    whole = whole_sizes(params, pieces)
    if parts is not None:
        assert pieces is None, "parts of shards"
        size: dict[int, int] = {}
        for owner, n in zip(parts, whole, strict=True):
            size[owner] = size.get(owner, 0) + n
        whole = [size[owner] for owner in parts]
    pieces = pieces or [None] * len(params)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    for idx in by_dtype.values():
        groups = [() if pieces[i] is None else pieces[i].groups for i in idx]
        # (the count scale alone takes no sums: nothing to cross the ranks)
        between = (lambda sums, groups=groups: all_reduce_sums(list(sums), groups)) if any(groups) and needs_sums(
            options["mask"]) else None
        if parts is not None and needs_sums(options["mask"]) and len({parts[i] for i in idx}) < len(idx):
            between = functools.partial(_sum_parts, torch.tensor([parts[i] for i in idx]))
        kernel(*([column[i] for i in idx] for column in columns), between=between, whole=[whole[i] for i in idx], **options)


def _sum_parts(owners: Tensor, sums: Tensor) -> None:
    """Every row of ``sums`` (one per entry) ← the sum of the rows of the same owner."""
    total = torch.zeros(int(owners.max()) + 1, sums.shape[1], dtype=sums.dtype).index_add_(0, owners, sums)
    sums.copy_(total.index_select(0, owners))


def step_(
    p: Tensor, u: Tensor, decay: float | Tensor, lr: float | Tensor, g: Tensor, m_prev: Tensor | None, m_new: Tensor,
    sums: Tensor | None, *, phase: str, mask: str, alpha: str, count_scale: bool, numel: Tensor | None = None,
) -> Tensor | None:
    """One tensor of a compiled kernel's call. In the ``"sums"`` phase, return its
    :func:`mask_sums` and write nothing (the caller then skips its state writes too).
    Otherwise ``p ← decay·p``, then ``p − lr·u`` or, with the mask component on, the masked
    step given ``sums``, this tensor's row of the sums call (:func:`phi_of`, :func:`apply_mask_`;
    ``numel``: the whole tensor's size when ``p`` is a shard)."""
    if phase == "sums":
        return mask_sums(u, phi_of(mask, g, m_prev, m_new))
    p.mul_(decay)
    if not mask_active(mask, count_scale):
        p.sub_(u * lr)
    else:
        apply_mask_(p, u, phi_of(mask, g, m_prev, m_new), sums, lr, alpha=alpha, count_scale=count_scale, numel=numel)
    return None
