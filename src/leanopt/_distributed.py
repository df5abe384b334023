"""Sharded parameters (FSDP2's ``fully_shard``, DTensor) in the functional cores.

Elementwise math runs on each rank's local shard. A statistic that spans more than one
element (an Adam-mini block mean, a masked step's whole-tensor sums) is computed from
every rank's partial sums, gathered with *one* ``all_reduce`` per process group, whatever
the number of blocks and tensors: at once (:func:`all_reduce_sums`), or at the end of the
optimizer step for work that can wait (:func:`reduce_later` inside
:func:`batched_reductions`). Nothing here needs a process group when no parameter is a
DTensor.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Piece", "piece_of", "remember", "local", "is_dtensor", "all_reduce_sums", "all_finite", "batched_reductions", "reduce_later",
           "rank_zero_ints"]


@functools.cache
def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    DTensor = _dtensor_cls()
    return DTensor is not None and isinstance(t, DTensor)


class Piece(NamedTuple):
    """This process's part of a DTensor, in the terms every statistic needs: which
    elements of the whole tensor it holds and which process groups hold the rest.

    The local tensor is the product of one set of global indices per dimension
    (``index[d]``: a 1-D tensor of positions along dim ``d``, or None for all of them):
    contiguous for ``Shard(d)``, even when the split is uneven (``torch.chunk``: the last
    ranks get fewer rows, or none), strided for FSDP2's ``_StridedShard`` over a TP shard.
    A partial sum over the local elements becomes the whole tensor's sum when it is added
    over every group of ``groups`` (one per mesh dimension that splits the tensor; a
    ``Replicate`` dimension holds copies and adds nothing)."""

    shape: tuple[int, ...]  # the whole tensor's
    index: tuple[Tensor | None, ...]
    groups: tuple[object, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def piece_of(t: Tensor, name: str = "a parameter") -> Piece | None:
    """The :class:`Piece` of a DTensor; None for a plain tensor. Placements other than
    ``Shard``/``_StridedShard``/``Replicate`` (a ``Partial`` parameter, whose local values
    are not its values) raise a ValueError naming ``name``."""
    if not is_dtensor(t):
        return None
    mesh = t.device_mesh
    # keyed by the mesh object itself: equal meshes of a re-created process group hold other groups
    key = (tuple(t.shape), tuple(t.placements), id(mesh))
    if key not in _PIECES:
        _PIECES[key] = (mesh, _piece(key[0], mesh, key[1], name))  # the entry keeps its mesh (and id) alive
    return _PIECES[key][1]


# a parameter's piece does not change between steps. Never emptied (one entry per shape, placement
# and mesh): a piece's identity keys the caches whose misses take a collective (adam_mini._ROWS),
# and a rank that called piece_of more often than the others must not lose its pieces alone
_PIECES: dict[tuple, tuple[object, Piece]] = {}


def remember(cache: dict, key: object, value: object, limit: int = 1 << 14) -> object:
    """``cache[key] = value``, emptying the cache first when it holds ``limit`` entries: a
    process that keeps building models must not grow it forever (entries are rebuilt on use).
    A cache whose misses take a collective must be filled only where every rank fills it,
    in the same order, so that all empty it at the same step."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


def _piece(shape: tuple[int, ...], mesh, placements: tuple, name: str) -> Piece:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as ShardPlacement
    from torch.distributed.tensor.placement_types import _StridedShard, _StridedShardOffsetMode

    index: list[Tensor | None] = [None] * len(shape)
    groups = []
    coordinate = mesh.get_coordinate()
    # mesh dimensions split the tensor from left to right, each splitting what the
    # previous ones left (the order torch.distributed.tensor applies them in)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, (ShardPlacement, _StridedShard)):
            raise ValueError(f"leanopt: parameter {name!r} has the placement {placement!r} on mesh dimension {mesh_dim}; "
                             "supported placements are Shard(dim), FSDP2's strided shards and Replicate() (a Partial "
                             "parameter holds summands, not values: redistribute it first)")
        d = placement.dim
        before = index[d]
        size = shape[d] if before is None else before.numel()
        # a strided shard reports its (non-contiguous) positions only when asked for all of them
        every = {"offset_mode": _StridedShardOffsetMode.ALL} if isinstance(placement, _StridedShard) else {}
        n, offset = placement._local_shard_size_and_offset(size, mesh.size(mesh_dim), coordinate[mesh_dim], **every)
        here = torch.arange(offset, offset + n) if isinstance(offset, int) else torch.tensor(offset, dtype=torch.long)
        index[d] = here if before is None else before[here]
        groups.append(mesh.get_group(mesh_dim))
    return Piece(shape, tuple(index), tuple(groups))


def local(t: Tensor) -> Tensor:
    """A DTensor's local tensor (a view of its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def all_reduce_sums(parts: list[Tensor], groups: list[tuple[object, ...] | None], op: str = "sum") -> None:
    """Reduce every ``parts[i]`` in place over the process groups ``groups[i]`` (a
    :class:`Piece`'s ``groups``; None or ``()``: local, nothing to do) with ``op`` ("sum"
    or "max"). One collective per distinct group, each on a flat concatenation: a tensor
    split along two mesh dimensions is reduced over one, then the other."""
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    depth = max((len(g) for g in groups if g), default=0)
    for level in range(depth):
        by_group: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            if g and level < len(g):
                by_group.setdefault(id(g[level]), []).append(i)
        for idx in by_group.values():
            flat = torch.cat([parts[i].reshape(-1) for i in idx])
            torch.distributed.all_reduce(flat, op=reduce_op, group=groups[idx[0]][level])
            for i, chunk in zip(idx, flat.split([parts[i].numel() for i in idx])):
                parts[i].copy_(chunk.view_as(parts[i]))


class _Later(NamedTuple):
    parts: Tensor  # this rank's partial sums
    groups: tuple[object, ...]  # the process groups to sum them over
    finish: Callable[[Tensor], None]  # what to do with the totals


_LATER: ContextVar[list[_Later] | None] = ContextVar("leanopt_reductions_for_the_end_of_the_step", default=None)


def reduce_later(parts: Tensor, groups: tuple[object, ...], finish: Callable[[Tensor], None]) -> None:
    """Sum ``parts`` over ``groups`` (a :class:`Piece`'s) and call ``finish(totals)`` -- at the end of the
    enclosing :func:`batched_reductions` (one collective for every such sum of the step),
    or now, outside one. ``finish`` must not need anything the rest of the step changes."""
    pending = _LATER.get()
    if pending is None:
        _finish([_Later(parts, groups, finish)])
    else:
        pending.append(_Later(parts, groups, finish))


@contextlib.contextmanager
def batched_reductions() -> Iterator[None]:
    """The span (one optimizer step) whose :func:`reduce_later` sums cross the ranks
    together, when it ends without an error: one ``all_reduce`` per process group, instead
    of one per tensor. Without sharded tensors nothing is deferred and nothing is collective."""
    pending: list[_Later] = []
    token = _LATER.set(pending)
    try:
        yield
    finally:
        _LATER.reset(token)
    _finish(pending)


def _finish(pending: list[_Later]) -> None:
    parts = [item.parts for item in pending]
    all_reduce_sums(parts, [item.groups for item in pending])
    for item, total in zip(pending, parts):
        item.finish(total)


def all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor holds only finite values; for a DTensor, its whole tensor: every
    rank gets the same answer (one ``all_reduce`` per process group), so that a parameter
    is skipped on all ranks or on none. One synchronization for the list."""
    if not tensors:
        return []
    bad = [(~torch.isfinite(local(t))).any().to(torch.float32).reshape(1) for t in tensors]
    all_reduce_sums(bad, [p.groups if (p := piece_of(t)) else None for t in tensors])
    return [x == 0 for x in torch.cat([b.to(bad[0].device) for b in bad]).tolist()]


def rank_zero_ints(values: list[int]) -> list[int]:
    """Rank 0's ``values`` on every rank of the default process group (``values`` itself when
    there is none): one broadcast. Collective: every rank must call it at the same point."""
    dist = torch.distributed
    if not values or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]
