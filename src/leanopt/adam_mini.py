"""Adam-mini: Adam with one second-moment scalar per parameter block.

Paper: Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", arXiv:2406.16793
(Algorithms 1-3, Principle 1). The math: ``docs/algorithms.md`` §1-2.

For every block ``B`` of a parameter (see :mod:`leanopt.partition`)::

    m   ← β1·m + (1−β1)·g
    v_B ← β2·v_B + (1−β2)·mean_{i∈B} g_i²
    p   ← p·(1 − lr·wd)                       (only where the rule decays)
    p   ← p − lr · (m / (1−β1^t)) / (sqrt(v_B) / sqrt(1−β2^t) + eps)

``eps`` sits outside the root, as in the released ``adam-mini`` 1.1.1, so that the two
can be compared to rounding error.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .precision import MOMENT, key_at, precision_defaults
from ._optimizer import (
    BOOL,
    BOOL_OR_NONE,
    NONNEG,
    Betas,
    LeanOptimizer,
    OneOf,
    ParamsT,
    acc_dtype,
    bias_corrections,
    decay_,
    decay_factor,
    direction,
    finite_terms,
    scalar,
    step_tensor,
    unwrap_model,
    user_stacklevel,
)
from . import _native
from ._backend import Backends, every_row
from ._compile import Kernel, field_index, fusable_groups, hyper
from ._distributed import Piece, all_reduce_sums, is_dtensor, piece_of, remember
from .mask import (agreement, mask_active, mask_checks, mask_defaults, masked_update_, native_two_pass, needs_sums, step_,
                   two_pass)
from .partition import UNRECOGNIZED, BlockLayout, BlockRule, PartitionRow, PartitionWarning, name_rule, partition_from_model
from .partition.layout import BlockView, lane_to_block
from .partition.rules import apply_overrides, partition_plain, warn_fallbacks, warn_unrecognized

__all__ = ["AdamMini", "AdamMiniStep", "adam_mini", "adam_mini_step"]


class AdamMiniStep(NamedTuple):
    """The scalars of one Adam-mini step for one parameter (blocks of ``count`` elements),
    in the order of the C kernel's row (``AM_*`` of ``csrc/cpu_kernels.c``)::

        g ← sign·g ;  m ← m + w·(g − m) ;  v_B ← beta2·v_B + gain2·mean_B(g²)
        p ← decay·p ;  p ← p − (lr/bc1)·m / (sqrt(v_B)/bc2_sqrt + eps)

    ``lr_bc1 = lr/bc1`` (the unmasked step's rate), ``bc1`` and ``lr`` (the masked step's)
    and ``v_gain = gain2/count`` (the compiled kernels' factor of a block's sum of g²)."""

    sign: float
    w: float
    beta2: float
    gain2: float
    count: float
    bc2_sqrt: float
    eps: float
    decay: float
    lr_bc1: float
    bc1: float
    lr: float
    v_gain: float


_F = field_index(AdamMiniStep)


def adam_mini_step(lr: float, beta1: float, beta2: float, step: float, layout: BlockLayout, *, eps: float,
                   weight_decay: float, decays: bool, maximize: bool) -> AdamMiniStep:
    """Adam-mini's coefficients at ``step`` for a tensor of ``layout`` (``decays``: whether
    its rule takes the weight decay)."""
    bc1, bc2_sqrt = bias_corrections(beta1, beta2, step)
    count = layout.numel // layout.n_blocks
    return AdamMiniStep(direction(maximize), 1 - beta1, beta2, 1 - beta2, count, bc2_sqrt, eps,
                        decay_factor(lr, weight_decay) if decays else 1.0, lr / bc1, bc1, lr, (1 - beta2) / count)


def adam_mini(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              layouts: list[BlockLayout], coeffs: list[AdamMiniStep], *, mask: str = "none", alpha: str = "none",
              count_scale: bool = False, pieces: list[Piece | None] | None = None) -> None:
    """Functional Adam-mini step over lists of tensors (per-tensor reference path).

    ``exp_avg_sqs[i]`` holds one value per block of ``layouts[i]``. ``mask``, ``alpha``,
    ``count_scale``: the AlphaAdam component (:mod:`leanopt.mask`), with
    ``u = m̂ / (sqrt(v̂_B) + eps)``. ``pieces``: of sharded tensors, which part each
    tensor is (:mod:`leanopt._backend`); ``exp_avg_sqs`` are then whole on every rank.
    """
    masked = mask_active(mask, count_scale)
    pieces = pieces or [None] * len(params)
    blocks = [BlockView(layout, piece) for layout, piece in zip(layouts, pieces, strict=True)]
    # the block sums of g² first: a shard's part of them, all shards' in one collective per group
    sums = [b.sq_sums(g, acc_dtype(p)) for b, p, g in zip(blocks, params, grads)]
    all_reduce_sums(sums, [b.groups for b in blocks])
    for p, g, m, v, c, b, block_sum, piece in zip(params, grads, exp_avgs, exp_avg_sqs, coeffs, blocks, sums, pieces,
                                                  strict=True):
        if c.sign < 0:
            g = -g
        phi = agreement(g, m) if mask == "async" else None
        m.lerp_(g, c.w)  # m ← β1·m + (1−β1)·g
        if mask == "sync":
            phi = agreement(g, m)
        v_b = _block_ema_(v, b.means(block_sum), c.beta2, c.gain2)  # v_B ← β2·v_B + (1−β2)·mean_B(g²)
        decay_(p, c.decay)
        denom = v_b.sqrt().div_(c.bc2_sqrt).add_(c.eps)  # sqrt(v̂_B) + eps
        if masked:
            masked_update_(p, b.scaled(m, 1 / (c.bc1 * denom)), phi, c.lr, alpha=alpha, count_scale=count_scale,
                           piece=piece)
        else:
            b.sub_scaled_(p, m, c.lr_bc1 / denom)  # p ← p − lr·m̂/(sqrt(v̂_B) + eps)


def _block_ema_(v: Tensor, x: Tensor, keep: float, gain: float) -> Tensor:
    """``v ← keep·v + gain·x`` in ``x``'s (accumulation) dtype; returns v as used: a
    low-precision v is updated in float32 and stored rounded, and what is stored is used."""
    if v.dtype == x.dtype:
        return v.mul_(keep).add_(x, alpha=gain)
    v.copy_(v.to(x.dtype).mul_(keep).add_(x, alpha=gain))
    return v.to(x.dtype)


def _mini_kernel(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], lanes: list[Tensor] | None,
                 counts: list[Tensor] | None, kind: str, H: Tensor, sums: Tensor | None, phase: str, mask: str, alpha: str,
                 count_scale: bool, whole: Tensor | None = None) -> tuple[Tensor | None, list[Tensor]]:
    # H: one AdamMiniStep per row. kind "blocks": the
    # tensor viewed as (n_blocks, block size), each row one block of consecutive elements; "rows"/"columns":
    # the 2-D views of other layouts, lanes[i] the block of every lane; "elements": flat, one block per
    # element; "whole": flat, one block.
    # "blocks" makes one pass: inductor fuses the sum of a row's g² with the update of that row into one
    # loop over rows, so g, p and m stream once. That holds only while the graph writes nothing of
    # another shape, so v is not written here: the new v is used inline and the row sums are returned
    # for _update_v_ (which computes the same float ops, so what is stored is what was used).
    # The other kinds take the block sums in one pass and update v, p and m in the next. With the mask,
    # the "sums" call updates v (or returns the row sums for it) and the "apply" call uses the stored v.
    # "given": a shard's rows (2-D), vs[i] this step's v of each row already (its blocks summed over the
    # ranks), only read; "given-columns" the same for column blocks, vs[i] one v a column; whole: the
    # whole tensors' sizes (the count scale of shards).
    out, row_sums = [], []
    for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        h = H[i]
        g = g * h[_F.sign]
        m_new = m.lerp(g, h[_F.w])
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        v_used = v.to(acc)
        if not kind.startswith("given") and (phase == "sums" or not needs_sums(mask)):  # v moves once: in the sums call if any
            g2 = finite_terms(g.to(acc) * g.to(acc))  # a NaN element must not reach its block's v
            if kind == "blocks":
                row_sums.append(g2.sum(dim=1))
                v_used = (v_used * h[_F.beta2] + row_sums[-1] * h[_F.v_gain]).to(v.dtype).to(acc)
            else:
                if kind == "elements":
                    block = g2
                elif kind == "whole":
                    block = g2.mean()
                else:
                    block = torch.zeros(v.shape, dtype=acc, device=v.device).index_add_(0, lanes[i], g2.sum(dim=1 if kind == "rows" else 0))
                    block = block / counts[i]
                v.copy_(v_used * h[_F.beta2] + block * h[_F.gain2])
                v_used = v.to(acc)  # low-precision v: what is stored is used
        scale = 1 / (h[_F.bc1] * (v_used.sqrt() / h[_F.bc2_sqrt] + h[_F.eps]))
        if kind in ("rows", "columns"):
            scale = scale.index_select(0, lanes[i])
        if kind in ("blocks", "rows", "given"):
            scale = scale.view(-1, 1)
        elif kind in ("columns", "given-columns"):
            scale = scale.view(1, -1)
        u = m_new * scale.to(p.dtype)
        part = step_(p, u, h[_F.decay], h[_F.lr], g, m, m_new, None if sums is None else sums[i], phase=phase, mask=mask, alpha=alpha,
                     count_scale=count_scale, numel=None if whole is None else whole[i])
        if part is not None:  # the sums call writes nothing
            out.append(part)
            continue
        m.copy_(m_new)
    return (torch.stack(out) if out else None), row_sums


_KERNEL = Kernel(_mini_kernel)


def _update_v_(vs: list[Tensor], row_sums: list[Tensor], beta2: float, coefs: list[float]) -> None:
    """``v ← β2·v + (1−β2)·mean(g²)`` from the block sums of the "blocks" kernel, in its float ops."""
    v_acc = [v.to(s.dtype) for v, s in zip(vs, row_sums)]  # v itself unless v is low-precision
    torch._foreach_mul_(v_acc, beta2)
    torch._foreach_add_(v_acc, torch._foreach_mul(row_sums, coefs))
    for v, new in zip(vs, v_acc):
        if new is not v:
            v.copy_(new)


def _kind(layout: BlockLayout) -> str:
    if layout.n_blocks == layout.numel:
        return "elements"
    if layout.n_blocks == 1:
        return "whole"
    if layout.axis == 0 and layout.uniform is not None:
        return "blocks"
    return "rows" if layout.axis == 0 else "columns"


def _adam_mini_compiled(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                        layouts: list[BlockLayout], coeffs: list[AdamMiniStep], *, mask: str, alpha: str,
                        count_scale: bool, pieces: list[Piece | None] | None = None) -> None:
    """The step by compiled kernels, with no full-size temporaries and no Python work per
    block. Where every block is a run of consecutive rows (embeddings, heads, neurons of an
    ``nn.Linear``), one pass over each tensor's memory; otherwise (column blocks, blocks of
    unequal sizes) two, the block sums being one ``index_add`` over the lanes. Shards
    (``pieces``): v from the blocks' sums over the ranks first, then the kernel from each
    local row's v (:func:`_adam_mini_compiled_shards`)."""
    shards = [i for i, piece in enumerate(pieces or []) if piece is not None and piece.groups]
    if shards:
        _adam_mini_compiled_shards(*([col[i] for i in shards] for col in (params, grads, exp_avgs, exp_avg_sqs, layouts,
                                                                           coeffs, pieces)),
                                   mask=mask, alpha=alpha, count_scale=count_scale)
        taken = set(shards)
        rest = [i for i in range(len(params)) if i not in taken]
        if not rest:
            return
        params, grads, exp_avgs, exp_avg_sqs, layouts, coeffs = ([col[i] for i in rest] for col in (
            params, grads, exp_avgs, exp_avg_sqs, layouts, coeffs))
    v_later: tuple[list[Tensor], list[Tensor], list[float]] = ([], [], [])  # one v update for all calls
    beta2 = coeffs[0].beta2
    for ids in fusable_groups(params, key=lambda i: (_kind(layouts[i]), layouts[i].view, layouts[i].n_blocks)):
        kind = _kind(layouts[ids[0]])
        coefs = [coeffs[i].v_gain for i in ids]
        p0 = params[ids[0]]
        lanes = counts = None
        if kind == "blocks":
            views = [(layouts[i].n_blocks, -1) for i in ids]
        elif kind in ("rows", "columns"):
            views = [layouts[i].view for i in ids]
            maps = [lane_to_block(layouts[i], p0.device, acc_dtype(p0)) for i in ids]
            lanes, counts = [mp[0] for mp in maps], [mp[1] for mp in maps]
        else:
            views = [(-1,)] * len(ids)
        tensors = ([params[i].view(vw) for i, vw in zip(ids, views)], [grads[i].view(vw) for i, vw in zip(ids, views)],
                   [exp_avgs[i].view(vw) for i, vw in zip(ids, views)], [exp_avg_sqs[i] for i in ids], lanes, counts, kind,
                   hyper([coeffs[i] for i in ids], p0))
        sums = None
        if needs_sums(mask):
            sums, row_sums = _KERNEL(*tensors, None, "sums", mask, alpha, count_scale)
            if row_sums:  # the apply call reads the stored v
                _update_v_(tensors[3], row_sums, beta2, coefs)
        _, row_sums = _KERNEL(*tensors, sums, "apply", mask, alpha, count_scale)
        if row_sums:
            v_later[0].extend(tensors[3])
            v_later[1].extend(row_sums)
            v_later[2].extend(coefs)
    if v_later[0]:
        _update_v_(*v_later[:2], beta2, v_later[2])


# the layouts the C kernel takes: blocks that are the rows of a 2-D view (one row for "whole",
# one element per row for "elements")
_NATIVE_KINDS = ("blocks", "whole", "elements")


def _adam_mini_native(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      layouts: list[BlockLayout], coeffs: list[AdamMiniStep], *, mask: str, alpha: str,
                      count_scale: bool) -> None:
    """The step by the C kernels: row layouts in one pass, two with the mask component (one
    call per dtype); column blocks in two (:func:`_adam_mini_columns`), three with the mask."""
    columns = [i for i, layout in enumerate(layouts) if _kind(layout) == "columns"]  # (one block, or one an element: rows)
    if columns:
        kernel = None
        if mask_active(mask, count_scale):  # v per column first, then the two passes of the mask
            kernel = functools.partial(_masked_columns, mask=mask, alpha=alpha, count_scale=count_scale)
        _adam_mini_columns(*([col[i] for i in columns] for col in (params, grads, exp_avgs, exp_avg_sqs)),
                           [BlockView(layouts[i]) for i in columns], [coeffs[i] for i in columns], kernel=kernel)
        if len(columns) == len(params):
            return
        taken = set(columns)
        params, grads, exp_avgs, exp_avg_sqs, layouts, coeffs = ([col[i] for i in range(len(params)) if i not in taken]
                                                                 for col in (params, grads, exp_avgs, exp_avg_sqs, layouts,
                                                                             coeffs))
    params, grads, exp_avgs, exp_avg_sqs, rows, coeffs, owners = _equal_runs(params, grads, exp_avgs, exp_avg_sqs, layouts,
                                                                             coeffs)
    cols = [int(c.count) for c in coeffs]
    if not mask_active(mask, count_scale):
        _native.adam_mini_rows(params, grads, exp_avgs, exp_avg_sqs, rows, cols, coeffs)
        return
    native_two_pass(_native.adam_mini_masked, [params, grads, exp_avgs, exp_avg_sqs, rows, cols, coeffs], None, owners,
                    mask=mask, alpha=alpha, count_scale=count_scale)


def _equal_runs(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                layouts: list[BlockLayout], coeffs: list[AdamMiniStep]) -> tuple[list[Any], ...]:
    """The C kernels' columns (p, g, m, v, blocks, step record, and the tensor each entry is
    a part of), one entry per run of equal blocks (:func:`_runs`)."""
    out: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
    for i, row in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, layouts, coeffs, strict=True)):
        for entry in _runs(*row):
            for column, x in zip(out, (*entry, i)):
                column.append(x)
    return out


def _runs(p: Tensor, g: Tensor, m: Any, v: Tensor, layout: BlockLayout, c: AdamMiniStep) -> list[tuple[Any, ...]]:
    """``(p, g, m, v, blocks, step record)`` of each run of equal blocks: one, the tensor
    itself, unless its row layout's blocks differ in size (a fused QKV weight: query and key
    heads, then value neurons). Runs are views of their rows and of their blocks' v (a compact
    m's codes and scales too, its bfloat16 rounding key moved to the run's first element, so
    that every element draws its bits); their steps are independent, as the blocks' are, but
    for the mask's sums: the whole tensor's (``native_two_pass``'s parts)."""
    if _kind(layout) != "rows":
        return [(p, g, m, v, layout.n_blocks, c)]
    merged: list[list[int]] = []  # [lanes, lanes per block], neighbours of one block size merged
    for n, k in layout.segments:
        if merged and merged[-1][1] == k:
            merged[-1][0] += n
        else:
            merged.append([n, k])
    cols, out, row, block = layout.lane_size, [], 0, 0
    for n, k in merged:
        count = k * cols
        out.append((*(x.view(layout.view)[row:row + n] for x in (p, g)), _momentum_rows(m, layout.view, row, n),
                    v[block:block + n // k], n // k, c._replace(count=float(count), v_gain=c.gain2 / count)))
        row, block = row + n, block + n // k
    return out


def _momentum_rows(m: Any, view: tuple[int, int], row: int, n: int) -> Any:
    """Rows ``row .. row + n`` of momentum ``m`` viewed as ``view``: a view, or, of compact
    codes (whose rows run along the tensor's last dimension, here ``view[1]``), a
    :class:`leanopt._native.CompactState` of those rows."""
    if not isinstance(m, _native.CompactState):
        return m.view(view)[row:row + n]
    rows = lambda x: x.view(view[0], -1)[row:row + n]  # noqa: E731
    return m._replace(codes=rows(m.codes), scales=None if m.scales is None else rows(m.scales),
                      key=key_at(m.key, row * view[1]))


def _adam_mini_columns(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Any], exp_avg_sqs: list[Tensor],
                       blocks: list[BlockView], coeffs: list[AdamMiniStep], sums: list[Tensor] | None = None,
                       kernel: Callable[..., None] | None = None) -> None:
    """Blocks of columns (a transposed weight, transformers' ``Conv1D``; a shard of one) by
    the C kernels: each column's sum of g² (a pass: :func:`_column_sums`), the blocks' sums
    (over the ranks for shards: one collective per group), v as the eager path moves it, then
    the step from each column's block v (``kernel``: :func:`leanopt._native.adam_mini_cols` by
    default, one pass; ``adam_mini_cols_compact`` for compact momentum; :func:`_masked_columns`
    with the mask, two). ``sums``: the blocks' sums already taken (and summed over the ranks)
    by the caller."""
    if sums is None:
        sums = _column_sums(grads, blocks)
        all_reduce_sums(sums, [b.groups for b in blocks])
    step = kernel or _native.adam_mini_cols  # (looked up per call: tests wrap the module's)
    step(params, grads, exp_avgs, _lane_v(blocks, sums, params, exp_avg_sqs, coeffs),
         [b.local_view[0] for b in blocks], [b.local_view[1] for b in blocks], coeffs)


def _masked_columns(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], lane_v: list[Tensor],
                    rows: list[int], cols: list[int], coeffs: list[AdamMiniStep], **options: Any) -> None:
    """The masked step of column blocks (whole tensors) from each column's v of this step."""
    native_two_pass(functools.partial(_native.adam_mini_masked, columns=True),
                    [params, grads, exp_avgs, lane_v, rows, cols, coeffs], None, **options)


def _column_sums(grads: list[Tensor], blocks: list[BlockView]) -> list[Tensor]:
    """Each column block's sum of g² over the elements held here (float64; one C pass)."""
    sums = _native.col_sq_sums(grads, [b.local_view[0] for b in blocks], [b.local_view[1] for b in blocks])
    return [b.lane_sums(s) for b, s in zip(blocks, sums)]


def _native_takes(row: list[Any], options: dict[str, Any]) -> bool:
    return _kind(row[4]) in (*_NATIVE_KINDS, "rows", "columns")


def _lane_v(blocks: list[BlockView], sums: list[Tensor], params: list[Tensor], exp_avg_sqs: list[Tensor],
            coeffs: list[AdamMiniStep]) -> list[Tensor]:
    """v from ``sums`` (each block's sum of g², whole: of a shard, already summed over the
    ranks), moved as the eager path moves it, and returned as one value per local lane (a
    row or a column of the local view)."""
    return [b.lane_values(_block_ema_(v, b.means(s.to(acc_dtype(p))), c.beta2, c.gain2), v.dtype)
            for b, s, p, v, c in zip(blocks, sums, params, exp_avg_sqs, coeffs, strict=True)]


def _adam_mini_compiled_shards(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                               exp_avg_sqs: list[Tensor], layouts: list[BlockLayout], coeffs: list[AdamMiniStep],
                               pieces: list[Piece], *, mask: str, alpha: str, count_scale: bool) -> None:
    """Shards by the compiled kernel: the blocks' sums of g² (each rank's part, summed over
    the ranks in one collective per group), v, then the kernel's ``"given"`` kind from each
    local lane's v (``"given-columns"``: column blocks; with the mask, its sums over the ranks
    between its two calls)."""
    blocks = [BlockView(layout, piece) for layout, piece in zip(layouts, pieces, strict=True)]
    sums = [b.sq_sums(g, acc_dtype(p)) for b, p, g in zip(blocks, params, grads)]
    all_reduce_sums(sums, [b.groups for b in blocks])
    v_rows = _lane_v(blocks, sums, params, exp_avg_sqs, coeffs)
    calls = []
    for idx in fusable_groups(params, key=lambda i: (blocks[i].layout.axis, blocks[i].local_view[1])):
        views = [blocks[i].local_view for i in idx]
        kind = "given" if blocks[idx[0]].layout.axis == 0 else "given-columns"
        calls.append((idx, ([params[i].view(vw) for i, vw in zip(idx, views)], [grads[i].view(vw) for i, vw in zip(idx, views)],
                            [exp_avgs[i].view(vw) for i, vw in zip(idx, views)], [v_rows[i] for i in idx], None, None, kind),
                      hyper([coeffs[i] for i in idx], params[idx[0]])))
    two_pass(lambda *args: _KERNEL(*args)[0], calls, params, pieces, mask=mask, alpha=alpha, count_scale=count_scale)


class _Rows(NamedTuple):
    """How the C step of shards covers one tensor's local rows (:meth:`BlockView.row_runs`)."""

    whole: list[tuple[int, int, int, int]]  # rows r0..r1 hold blocks b0..b1 whole: one pass, v[b0:b1] moved in place
    other: list[tuple[int, int]]  # the rest: their blocks' sums of g² cross the ranks, then the "given" pass
    held: Tensor  # (n_blocks,) bool: the blocks of ``whole``
    anywhere: Tensor  # (n_blocks,) bool: the blocks one rank of the groups holds whole (its v crosses as it is)
    other_blocks: Tensor  # the block of every row of ``other``, in order


# (layout, id(piece)) -> (piece, rows); pieces are cached by _distributed.piece_of, so an id stays one piece
_ROWS: dict[tuple[BlockLayout, int], tuple[Piece, _Rows]] = {}


def _rows_of(blocks: list[BlockView], pieces: list[Piece]) -> list[_Rows]:
    """Each tensor's :class:`_Rows`, computed the first time a tensor is seen: which blocks some
    rank holds whole takes one collective (per group) for all of them, on every rank at once, as
    the ranks step the same tensors in the same order. (So the cache is filled only here, and
    its keys are pieces, which :func:`leanopt._distributed.piece_of` never drops.)"""
    keys = [(b.layout, id(piece)) for b, piece in zip(blocks, pieces)]
    known = {i: _ROWS[key][1] for i, key in enumerate(keys) if key in _ROWS}
    new = [i for i in range(len(keys)) if i not in known]
    if new:
        found = {}
        for i in new:
            b = blocks[i]
            whole, other = b.row_runs()
            held = torch.zeros(b.layout.n_blocks, dtype=torch.bool)
            for _, _, b0, b1 in whole:
                held[b0:b1] = True
            ids = torch.arange(b.local_view[0]) if b.lane_ids is None else b.lane_ids.cpu()
            rows = torch.cat([ids[r0:r1] for r0, r1 in other]) if other else ids[:0]
            found[i] = (whole, other, held, lane_to_block(b.layout, torch.device("cpu"), torch.float64)[0][rows])
        counts = [found[i][2].to(torch.float64) for i in new]
        all_reduce_sums(counts, [pieces[i].groups for i in new])
        for i, n in zip(new, counts):
            whole, other, held, other_blocks = found[i]
            known[i] = remember(_ROWS, keys[i], (pieces[i], _Rows(whole, other, held, n > 0, other_blocks)))[1]
    return [known[i] for i in range(len(keys))]


def _adam_mini_sharded(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                       layouts: list[BlockLayout], coeffs: list[AdamMiniStep], *, mask: str, alpha: str,
                       count_scale: bool, pieces: list[Piece | None]) -> None:
    """The step of shards by the C kernels: row blocks by :func:`_adam_mini_sharded_rows`,
    column blocks by :func:`_adam_mini_columns`, or with the mask by :class:`_ColumnPasses`
    around the rows' passes; their sums of g² cross the ranks in the rows' collective, their
    mask sums in the rows' second (one collective per group per kind, as on the eager path)."""
    blocks = [BlockView(layout, piece) for layout, piece in zip(layouts, pieces, strict=True)]
    by_axis = [[i for i, b in enumerate(blocks) if b.layout.axis == axis] for axis in (0, 1)]
    rows, cols = ([[col[i] for i in idx] for col in (params, grads, exp_avgs, exp_avg_sqs, blocks, coeffs)] for idx in by_axis)
    col_sums = _column_sums(cols[1], cols[4]) if by_axis[1] else []
    with_rows = (col_sums, [b.groups for b in cols[4]])
    masked = bool(by_axis[1]) and mask_active(mask, count_scale)
    columns = _ColumnPasses(*cols, col_sums, [pieces[i] for i in by_axis[1]], mask=mask, alpha=alpha,
                            count_scale=count_scale) if masked else None
    if by_axis[0]:
        _adam_mini_sharded_rows(*rows, [pieces[i] for i in by_axis[0]], mask=mask, alpha=alpha, count_scale=count_scale,
                                with_rows=with_rows, columns=columns)
    else:
        all_reduce_sums(*with_rows)
        if columns is not None:
            columns.first()
            if needs_sums(mask):
                all_reduce_sums(list(columns.sums), columns.groups)
            columns.second()
    if by_axis[1] and columns is None:
        _adam_mini_columns(*cols, sums=col_sums)


class _ColumnPasses:
    """Column blocks of shards with the mask component, stepped inside the rows' collectives:
    :meth:`first`, once the blocks' sums of g² crossed the ranks, moves v and takes the mask
    sums pass into :attr:`sums` (whose rows cross the ranks over :attr:`groups`), and
    :meth:`second` steps from them. One C call per dtype and pass."""

    def __init__(self, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 blocks: list[BlockView], coeffs: list[AdamMiniStep], block_sums: list[Tensor], pieces: list[Piece],
                 **options: Any) -> None:
        order = sorted(range(len(params)), key=lambda i: str(params[i].dtype))  # each dtype's rows of sums side by side
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.blocks, self.coeffs, self.block_sums, pieces = (
            [col[i] for i in order] for col in (params, grads, exp_avgs, exp_avg_sqs, blocks, coeffs, block_sums, pieces))
        self.options = options
        self.groups = [piece.groups for piece in pieces]
        self.sums = torch.zeros(len(params), 3, dtype=torch.float64)
        self.lane_v: list[Tensor] = []

    def _pass(self, phase: int) -> None:
        start = 0
        for _, run in itertools.groupby(range(len(self.params)), key=lambda i: self.params[i].dtype):
            idx = list(run)
            _native.adam_mini_masked_pass(
                phase, *([col[i] for i in idx] for col in (self.params, self.grads, self.exp_avgs, self.lane_v)),
                [self.blocks[i].local_view[0] for i in idx], [self.blocks[i].local_view[1] for i in idx],
                [self.coeffs[i] for i in idx], given=True, columns=True, sums=self.sums[start:start + len(idx)],
                whole=[self.blocks[i].layout.numel for i in idx], **self.options)
            start += len(idx)

    def first(self) -> None:
        self.lane_v = _lane_v(self.blocks, self.block_sums, self.params, self.exp_avg_sqs, self.coeffs)
        if needs_sums(self.options["mask"]):  # (the count scale alone takes no sums)
            self._pass(1)

    def second(self) -> None:
        self._pass(2)


class _Flat(NamedTuple):
    """One call's tensors' blocks in one flat vector, those summed over the same groups side by side."""

    order: list[int]  # the tensors in the flat order
    sizes: list[int]  # their blocks
    spans: list[tuple[int, int, tuple[object, ...]]]  # (start, end, groups) of each group's part
    held: Tensor  # bool: the blocks this rank holds whole
    anywhere: Tensor  # bool: the blocks one rank holds whole
    other_blocks: Tensor  # the flat block of every row of the tensors' ``other`` runs, in tensor order
    counts: Tensor  # elements per block (float64)


_FLATS: dict[tuple, tuple[list[Piece], _Flat]] = {}  # a step's tensors keep their pieces: one plan per call


def _flat(blocks: list[BlockView], pieces: list[Piece], runs: list[_Rows]) -> _Flat:
    key = tuple((b.layout, id(piece)) for b, piece in zip(blocks, pieces))
    if key in _FLATS:
        return _FLATS[key][1]
    by_groups: dict[tuple[int, ...], list[int]] = {}
    for i, piece in enumerate(pieces):
        by_groups.setdefault(tuple(map(id, piece.groups)), []).append(i)
    order = [i for idx in by_groups.values() for i in idx]
    sizes = [blocks[i].layout.n_blocks for i in order]
    start = dict(zip(order, itertools.accumulate([0, *sizes])))
    spans = [(start[idx[0]], start[idx[-1]] + blocks[idx[-1]].layout.n_blocks, pieces[idx[0]].groups)
             for idx in by_groups.values()]
    cpu = torch.device("cpu")
    flat = _Flat(order, sizes, spans, torch.cat([runs[i].held for i in order]), torch.cat([runs[i].anywhere for i in order]),
                 torch.cat([runs[i].other_blocks + start[i] for i in range(len(runs))]),
                 torch.cat([lane_to_block(blocks[i].layout, cpu, torch.float64)[1] for i in order]))
    return remember(_FLATS, key, (pieces, flat))[1]  # the entry keeps its pieces (and ids) alive


def _adam_mini_sharded_rows(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                            exp_avg_sqs: list[Tensor], blocks: list[BlockView], coeffs: list[AdamMiniStep],
                            pieces: list[Piece], *, mask: str, alpha: str, count_scale: bool,
                            with_rows: tuple[list[Tensor], list[tuple[object, ...]]] = ([], []),
                            columns: _ColumnPasses | None = None) -> None:
    """Row blocks of shards in about the passes over memory of the unsharded step. The blocks a
    rank holds whole (most: FSDP2 cuts a tensor between rows, and a block is a run of rows) take
    the unsharded kernel's pass that moves their v (with the mask, its sums pass); the rows of
    blocks split between ranks sum their g² (a pass over them alone). One collective per group
    carries both, each rank adding its part: the new v of the blocks it holds whole (the others
    add nothing) and its sums of the split ones. Every rank then holds the whole new v, and
    the split blocks' rows step from it. With the mask, their sums pass follows, the mask's sums
    cross the ranks (a second collective), and every row takes the apply pass. ``with_rows``:
    other sums (and their groups) to reduce in the same collective, in place; ``columns``: the
    masked column blocks, whose passes run around the second."""
    batches: dict[tuple, list[int]] = {}  # one flat v per batch: one dtype and one beta2
    for i, (v, c) in enumerate(zip(exp_avg_sqs, coeffs)):
        batches.setdefault((v.dtype, params[i].dtype, c.beta2), []).append(i)
    if len(batches) > 1:
        for k, idx in enumerate(batches.values()):
            _adam_mini_sharded_rows(*([col[i] for i in idx] for col in (params, grads, exp_avgs, exp_avg_sqs, blocks,
                                                                        coeffs, pieces)),
                                    mask=mask, alpha=alpha, count_scale=count_scale, with_rows=with_rows if k == 0 else ([], []),
                                    columns=columns if k == 0 else None)
        return
    runs = _rows_of(blocks, pieces)
    flat = _flat(blocks, pieces, runs)
    masked = mask_active(mask, count_scale)

    def slabs(spans: list[tuple[int, ...]]) -> list[list[Tensor]]:
        return [[col[i].view(-1)[r0 * blocks[i].local_view[1]:r1 * blocks[i].local_view[1]] for i, r0, r1, *_ in spans]
                for col in (params, grads, exp_avgs)]

    whole = [(i, r0, r1, b0, b1) for i, r in enumerate(runs) for r0, r1, b0, b1 in r.whole]
    held = [*slabs(whole), [exp_avg_sqs[i][b0:b1] for i, _, _, b0, b1 in whole], [b1 - b0 for *_, b0, b1 in whole],
            [int(coeffs[i].count) for i, *_ in whole], [coeffs[i] for i, *_ in whole]]
    passes = functools.partial(_native.adam_mini_masked_pass, mask=mask, alpha=alpha, count_scale=count_scale)
    sums = torch.zeros(len(whole), 3, dtype=torch.float64)  # the mask's sums of each slab
    if whole and masked:
        passes(1, *held, given=False, sums=sums)
    elif whole:
        _native.adam_mini_rows(*held)
    other = [(i, r0, r1) for i, r in enumerate(runs) for r0, r1 in r.other]
    split = slabs(other)
    split += [list(_shared_v(params, split[1], exp_avg_sqs, blocks, coeffs, flat, other, with_rows)),
              [r1 - r0 for _, r0, r1 in other], [blocks[i].local_view[1] for i, _, _ in other], [coeffs[i] for i, _, _ in other]]
    if not masked:
        if other:
            _native.adam_mini_rows(*split, given=True)
        return
    sums = torch.cat([sums, torch.zeros(len(other), 3, dtype=torch.float64)])
    if other:
        passes(1, *split, given=True, sums=sums[len(whole):])
    if columns is not None:
        columns.first()
    owner = torch.tensor([i for i, *_ in whole + other], dtype=torch.long)
    if needs_sums(mask):  # each tensor's sums: its slabs', then the ranks' (and the column blocks')
        totals = torch.zeros(len(params), 3, dtype=torch.float64).index_add_(0, owner, sums)
        extra = (list(columns.sums), columns.groups) if columns is not None else ([], [])
        all_reduce_sums(list(totals) + extra[0], [piece.groups for piece in pieces] + extra[1])
        sums = totals[owner]
    sizes = [pieces[i].numel for i, *_ in whole + other]
    passes(2, *(a + b for a, b in zip(held, split)), given=True, sums=sums, whole=sizes)
    if columns is not None:
        columns.second()


def _shared_v(params: list[Tensor], other_grads: list[Tensor], exp_avg_sqs: list[Tensor], blocks: list[BlockView],
              coeffs: list[AdamMiniStep], flat: _Flat, other: list[tuple[int, int, int]],
              with_rows: tuple[list[Tensor], list[tuple[object, ...]]]) -> tuple[Tensor, ...]:
    """Every block's v of this step on every rank, after the held blocks' pass moved theirs:
    the sums of g² of the ``other`` rows (row runs of split blocks; ``other_grads``: their
    gradients), one collective per group carrying those sums and the held blocks' v (and
    ``with_rows``), v moved; returns the v of each ``other`` run's rows."""
    sums = _native.row_sq_sums(other_grads, [r1 - r0 for _, r0, r1 in other], [blocks[i].local_view[1] for i, _, _ in other])
    acc, c = acc_dtype(params[0]), coeffs[0]
    v_all = torch.cat([exp_avg_sqs[i] for i in flat.order]).to(acc)  # the held blocks' v as their pass left it
    parts = torch.where(flat.held, v_all, 0.0)  # (the others' v: 0, their own rank adds it)
    if other:
        parts.index_add_(0, flat.other_blocks, torch.cat(sums).to(acc))
    all_reduce_sums([parts[a:b] for a, b, _ in flat.spans] + with_rows[0], [groups for *_, groups in flat.spans] + with_rows[1])
    split = v_all.mul_(c.beta2).add_(parts / flat.counts.to(acc), alpha=c.gain2)  # the split blocks' v, as _block_ema_
    new = torch.where(flat.anywhere, parts, split).to(exp_avg_sqs[0].dtype)
    torch._foreach_copy_([exp_avg_sqs[i] for i in flat.order], list(new.split(flat.sizes)))
    return new[flat.other_blocks].split([r1 - r0 for _, r0, r1 in other]) if other else ()


def _compact_takes(row: list[Any], options: dict[str, Any]) -> bool:
    """The one-pass compact kernel's cases: the C kernel's, where a block's elements and a
    row of the momentum's codes (the tensor's last dimension) tile each other; a 2-D row
    layout whose blocks differ in size run of equal blocks by run (:func:`_runs`), unmasked
    (a masked call's sums are its own)."""
    p, layout = row[0], row[4]
    last = p.shape[-1] if p.dim() else 1
    if _kind(layout) == "columns":  # a row of codes is a row of the view: the column kernel, row by row
        return layout.view[1] == last and not mask_active(options["mask"], options["count_scale"])
    if _kind(layout) == "rows":
        return (p.dim() == 2 and not mask_active(options["mask"], options["count_scale"])
                and max(k for _, k in layout.segments) * last <= _native.COMPACT_MAX_SPAN)
    count = int(row[5].count)
    return (_kind(layout) in _NATIVE_KINDS and (count % last == 0 or last % count == 0)
            and max(count, last) <= _native.COMPACT_MAX_SPAN)


def _adam_mini_compact(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Any], exp_avg_sqs: list[Tensor],
                       layouts: list[BlockLayout], coeffs: list[AdamMiniStep], *, mask: str, alpha: str,
                       count_scale: bool) -> None:
    columns = [i for i, layout in enumerate(layouts) if _kind(layout) == "columns"]  # (only unmasked: _compact_takes)
    if columns:
        _adam_mini_columns(*([col[i] for i in columns] for col in (params, grads, exp_avgs, exp_avg_sqs)),
                           [BlockView(layouts[i]) for i in columns], [coeffs[i] for i in columns],
                           kernel=_native.adam_mini_cols_compact)
    taken = set(columns)
    for i, row in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, layouts, coeffs)):  # compact m: one pass, two masked
        if i in taken:
            continue
        for p, g, m, v, blocks, c in _runs(*row):  # (runs only unmasked: _compact_takes)
            _native.adam_mini_compact(p, g, m, v, blocks, int(c.count), c, mask=mask, alpha=alpha, count_scale=count_scale)


BACKENDS = Backends(streams=4, eager=adam_mini, compiled=_adam_mini_compiled, compiled_shards=every_row,
                    native=_adam_mini_native,
                    native_takes=_native_takes, compact=_adam_mini_compact, compact_takes=_compact_takes,
                    compact_formats=("int8", "int4", "bf16"),
                    sharded=_adam_mini_sharded)


PARTITIONS = ("auto", "model", "names", "plain")


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"AdamMini: Invalid {name}: {value!r}; {name} must be a positive int or None")


class AdamMini(LeanOptimizer):
    """Adam-mini (arXiv:2406.16793): Adam with one second moment per Hessian block.

    The state is the first moment ``m`` (one value per element) plus one second-moment
    value per block — about half of AdamW's. The update is in the module docstring.

    Three ways to say how parameters split into blocks (``partition=``):

    * ``"model"``, **structure-aware** (recommended; what ``"auto"`` picks whenever the model
      is known): ``AdamMini(model)`` or ``AdamMini(params, model=model)``. The partition
      is read from the module types and the model's config: token/position embeddings
      and the output head get one block per row, query/key projections one per
      attention head (``head_dim`` and the key-value head count of GQA/MQA come from the
      attention modules or the config, overridable with ``n_heads``/``n_kv_heads``/
      ``head_dim``), values, attention outputs and MLP layers one per output neuron (a
      *column* of a transformers ``Conv1D``), fused QKV weights (``c_attn``, ``qkv_proj``,
      ``Wqkv``, interleaved ``query_key_value``, ``nn.MultiheadAttention.in_proj_weight``)
      are split into their Q/K/V parts, fused mixture-of-experts weights one per output
      neuron of each expert and routers one per expert, convolutions one per output
      channel, ViT class/register tokens and position tables one per row, Mamba's
      ``A_log`` one per channel and ``D`` per element, LoRA ``lora_A``/``lora_B`` one per
      output neuron, biases are plain Adam, norms one block per tensor. A parameter no
      rule recognizes gets one block and is named in a warning.
    * ``"names"``, **drop-in for adam-mini 1.1.1** (what ``"auto"`` picks when ``dim=`` or
      ``n_heads=`` is given without a model): ``AdamMini(model.named_parameters(),
      dim=..., n_heads=..., n_kv_heads=...)``: the substring rules of the released
      package, giving the same partition and the same trajectory.
    * ``"plain"``, no model: one block per tensor, with a warning. Names alone do not
      change the partition: they are metadata, as in ``torch.optim``.

    See ``docs/algorithms.md`` (Adam-mini) and the README for the rules and their reasons.

    Args:
        params: the model, or parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: learning rate (read at every step, so schedulers work; a float or a one-element
            tensor). Default 1e-3.
        betas: ``(β1, β2)``, each in [0, 1). Default (0.9, 0.999).
        eps: added to the bias-corrected root of ``v`` (outside the root). Default 1e-8.
        weight_decay: decoupled weight decay; by default not applied to norms, biases and
            other tensors of fewer than two dimensions. Default 0.
        model: the module the parameters belong to; enables the structure-aware partition.
        partition: ``"auto"`` (default), ``"model"``, ``"names"`` or ``"plain"`` (above).
        dim: hidden size, for the name-based partition (adam-mini's ``dim``).
        n_heads: number of attention (query) heads.
        n_kv_heads: number of key/value heads (GQA/MQA); must divide ``n_heads``.
        head_dim: outputs per attention head, when it is not ``dim / n_heads``.
        value_blocks: ``"neuron"`` (default) or ``"whole"`` — one block for the whole value
            projection (the paper's App. C.5 finds it better for short runs).
        overrides: ``{name pattern: rule}`` to force the rule of matching parameters
            (``fnmatch`` patterns on parameter names); a rule is ``"element"``,
            ``"neuron"``, ``"whole"`` or ``"head:N"`` (blocks of N output neurons).
        decay_exclusions: if False, weight decay applies to every parameter. Default True.
        mask, alpha, count_scale: the AlphaAdam mask component (:mod:`leanopt.mask`) with
            ``u = m̂/(sqrt(v̂_B) + eps)``: ``mask="async"`` gives a memory-light AlphaAdam.
            Default ``mask="none"``; with a mask on, ``alpha`` and ``count_scale`` default
            to AlphaAdam's (``"squared"``, True).
        maximize: maximize the objective instead of minimizing it. Default False.
        fused: which backend runs the step, as :class:`leanopt.AlphaAdam`: on the CPU the
            C kernels (blocks of consecutive rows -- embeddings, heads, neurons of
            ``nn.Linear`` -- one pass over memory per tensor, two with the mask; column
            blocks two, three with the mask), on CUDA the compiled kernels. Default None
            (the fastest).
        skip_nonfinite: skip the step of a parameter whose gradient holds a NaN or an
            Inf (state untouched) and count it in ``nonfinite_skips``; without it, the
            non-finite value reaches that element only (``docs/algorithms.md`` §0). Default False.
        state_precision, state_block_size, state_min_size, stochastic_rounding: how the
            state is stored (``"param"``, ``"bf16"``, ``"int8"``, ``"int4"``) and whether
            bfloat16 parameters are rounded stochastically; the same on every leanopt
            optimizer (:mod:`leanopt.precision`, ``docs/algorithms.md`` §8).

    Reductions run in float32 (float64 for float64 parameters); state tensors take the
    parameter's dtype, as in ``torch.optim`` (a ``state_dict`` round trip casts them so).
    Parameters added later with ``add_param_group`` are partitioned by the model when they
    belong to it (it is walked again), by the name rules under ``partition="names"``, else
    one block per tensor.
    """

    _checks = {
        "lr": NONNEG,
        "betas": Betas(),
        "eps": NONNEG,
        "weight_decay": NONNEG,
        "maximize": BOOL,
        "fused": BOOL_OR_NONE,
        **mask_checks(),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        model: nn.Module | None = None,
        partition: str = "auto",
        dim: int | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_blocks: str = "neuron",
        overrides: Mapping[str, str] | None = None,
        decay_exclusions: bool = True,
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
        for name, value in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            _positive_int_or_none(name, value)
        if n_heads is not None and n_kv_heads is not None and n_heads % n_kv_heads:
            raise ValueError(f"AdamMini: Invalid n_kv_heads: {n_kv_heads}; it must divide n_heads={n_heads}")
        OneOf(PARTITIONS).check("partition", partition)
        OneOf(("neuron", "whole")).check("value_blocks", value_blocks)
        BOOL.check("decay_exclusions", decay_exclusions)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"AdamMini: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(params, nn.Module):  # AdamMini(model, ...), as pytorch_optimizer's AdamMini
            if model is not None and unwrap_model(model) is not unwrap_model(params):
                raise ValueError("AdamMini: params is a model and model= is another one; pass one of them")
            model = params
        if partition == "auto":
            partition = "model" if model is not None else "names" if dim is not None or n_heads is not None else "plain"
        if partition == "model" and model is None:
            raise ValueError("AdamMini: partition='model' needs the model: AdamMini(model) or model=model")
        if dim is not None and n_heads is not None and head_dim is None and model is not None and dim % n_heads == 0:
            head_dim = dim // n_heads

        self._partition = partition
        self._dim, self._n_heads = dim, n_heads
        self._decay_exclusions = decay_exclusions
        self._rules: dict[Tensor, BlockRule] = {}
        self._model_rules: dict[Tensor, BlockRule] | None = None
        self._model_names: dict[Tensor, str] = {}
        self._fallbacks: list[str] = []
        self._found_structure = False
        self._model_ref: weakref.ref | None = None
        if partition == "model":
            # kept weakly, for parameters added later with add_param_group (not pickled)
            self._model_ref = weakref.ref(unwrap_model(model))
            self._walk = functools.partial(partition_from_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                           head_dim=head_dim, value_blocks=value_blocks)
            found = self._walk(model)
            self._model_rules, self._model_names = found.rules, found.names
            self._fallbacks, self._found_structure = found.fallbacks, found.found_structure
        elif model is not None:  # names for the name rules and reports
            self._model_names = {p: n for n, p in unwrap_model(model).named_parameters()}
        self._warned_plain = self._constructed = False
        self._plain: list[Tensor] = []  # the tensors of one block for want of a model, while constructing

        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, fused=fused,
                        skip_nonfinite=skip_nonfinite, **mask_defaults(mask, alpha, count_scale),
                        **precision_defaults(state_precision, state_block_size, state_min_size, stochastic_rounding))
        super().__init__(params, defaults)
        # the model-wide table served construction; keeping it would pin (and deepcopy)
        # every model tensor, also the frozen ones
        self._model_rules = None
        overridden = apply_overrides(self._rules, self._all_names(), overrides) if overrides else set()
        if any(p not in overridden for p in self._plain):
            self._warn_plain()
        self._plain = []
        self._warn_structure()
        self._constructed = True

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_model_ref": None}  # a copy does not follow the original's model

    # -- partition ------------------------------------------------------------------------
    def _all_names(self) -> dict[Tensor, str]:
        names = dict(self._model_names)
        names.update(self.param_names())
        return {p: names[p] for p in self._rules if p in names}

    def _rule_for(self, p: Tensor, name: str | None) -> BlockRule:
        if self._model_rules is not None and p in self._model_rules:
            rule = self._model_rules[p]
        elif self._partition == "names" and (name or self._model_names.get(p)):
            rule = name_rule(name or self._model_names[p], p.shape, self._dim, self._n_heads)
            if any(k in rule.rule for k in ("query", "key", "embedding", "output")):
                self._found_structure = True
        else:
            rule = partition_plain([p])[p]
            if self._partition == "model":  # not a parameter of the model
                rule = BlockRule(UNRECOGNIZED, rule.layout, rule.decay)
            elif self._constructed:
                self._warn_plain()
            else:  # warned after construction, unless the overrides name every such tensor
                self._plain.append(p)
        if not self._decay_exclusions and not rule.decay:
            rule = BlockRule(rule.rule, rule.layout, decay=True)
        return rule

    def _warn_plain(self) -> None:
        if self._warned_plain:
            return
        self._warned_plain = True
        warnings.warn(
            "AdamMini got no model, so it uses one block per tensor (PyTorch's default "
            "partition), which can be unstable for transformers. Pass the model "
            "(AdamMini(model) or model=model) for the structure-aware partition, or "
            "partition='names' with dim= and n_heads= for adam-mini 1.1.1's name rules.",
            PartitionWarning,
            stacklevel=user_stacklevel(),
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        model = self._model_ref() if self._constructed and self._model_ref is not None else None
        if model is not None:  # after construction the model may have grown (a new head): walk it again
            found = self._walk(model)
            self._model_rules, self._model_names = found.rules, {**self._model_names, **found.names}
        try:
            for p, name in zip(group["params"], group.get("param_names") or [None] * len(group["params"])):
                if p not in self._rules:
                    self._rules[p] = self._rule_for(p, name)
        except ValueError:
            self.param_groups.pop()
            raise
        if self._constructed:
            self._model_rules = None
            warn_unrecognized(self._unrecognized_names(group["params"]))

    def _unrecognized_names(self, params: Iterable[Tensor]) -> list[str]:
        names = self._all_names()
        return [names.get(p) or self.param_name(p) for p in params if self._rules[p].rule == UNRECOGNIZED]

    def _warn_structure(self) -> None:
        warn_fallbacks(self._fallbacks)
        warn_unrecognized(self._unrecognized_names(self._rules))
        if self._partition != "plain" and not self._found_structure:
            warnings.warn(
                "AdamMini found no embedding, output head or attention projection among the "
                "parameters; if this is a transformer, pass model=model (or dim= and n_heads= "
                "with named parameters) so that blocks follow its heads and neurons.",
                PartitionWarning,
                stacklevel=user_stacklevel(),
            )

    def describe_partition(self) -> list[PartitionRow]:
        """One row per parameter: name, shape, rule, blocks and state elements (m + v)."""
        names = self._all_names()
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                rule = self._rules[p]
                rows.append(
                    PartitionRow(
                        name=names.get(p) or self.param_name(p),
                        shape=tuple(p.shape),
                        rule=rule.rule,
                        blocks=rule.layout.n_blocks,
                        state_elements=p.numel() + rule.layout.n_blocks,
                        weight_decay=rule.decay,
                    )
                )
        return rows

    # -- state ----------------------------------------------------------------------------
    _state_keys = ("step", "exp_avg", "exp_avg_sq")
    _element_kinds = {"exp_avg": MOMENT}  # v is one value per block, kept at the parameter's precision

    def _expected_shape(self, p: Tensor, key: str) -> tuple[int, ...] | None:
        if key == "exp_avg_sq":
            return (self._rules[p].layout.n_blocks,)
        return super()._expected_shape(p, key)

    def _shape_hint(self, key: str) -> str:
        if key == "exp_avg_sq":
            return ("its second-moment blocks are not those of this optimizer's partition; build the optimizer the same "
                    "way as the one that was saved")
        return super()._shape_hint(key)

    # -- step -----------------------------------------------------------------------------
    def _update(self) -> None:
        for group in self.param_groups:
            params, grads = self._grads(group)
            if not params:
                continue
            exp_avgs, exp_avg_sqs, steps, layouts = [], [], [], []
            for p in params:
                rule = self._rules[p]
                state = self.state[p]
                if not state:
                    state["step"] = step_tensor()
                    state["exp_avg_sq"] = torch.zeros(rule.layout.n_blocks, dtype=p.dtype, device=p.device)
                    if is_dtensor(p):  # that its blocks can be summed across its shards: an error names it now
                        BlockView(rule.layout, piece_of(p, self.param_name(p)), self.param_name(p))
                exp_avgs.append(self._element_state(group, p, "exp_avg", torch.contiguous_format))
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                layouts.append(rule.layout)
            torch._foreach_add_(steps, 1)  # every counter in two calls, read once
            lr, (beta1, beta2) = scalar(group["lr"]), group["betas"]
            coeffs = [adam_mini_step(lr, beta1, beta2, step, layout, eps=group["eps"], weight_decay=group["weight_decay"],
                                     decays=self._rules[p].decay, maximize=group["maximize"])
                      for p, layout, step in zip(params, layouts, torch.stack(steps).tolist())]
            self._route(BACKENDS, group, params, grads, exp_avgs, exp_avg_sqs, layouts, coeffs, mask=group["mask"],
                        alpha=group["alpha"], count_scale=group["count_scale"])
