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
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Shard", "is_dtensor", "row_shard", "all_reduce_sums", "all_finite", "batched_reductions", "reduce_later"]


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    DTensor = _dtensor_cls()
    return DTensor is not None and isinstance(t, DTensor)


class Shard(NamedTuple):
    local: Tensor  # this rank's elements (a view sharing the parameter's storage)
    flat_offset: int  # index of its first element in the full, row-major tensor
    group: object  # the process group to reduce over


def row_shard(t: Tensor) -> Shard | None:
    """This rank's part of a DTensor sharded along dim 0 (FSDP2's layout); None for a
    plain tensor. Other placements are rejected with an explanation."""
    DTensor = _dtensor_cls()
    if DTensor is None or not isinstance(t, DTensor):
        return None
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as ShardPlacement

    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or not (isinstance(placements[0], ShardPlacement) and placements[0].dim == 0) and not isinstance(placements[0], Replicate):
        raise ValueError(f"leanopt: DTensor parameters must be sharded along dim 0 on a 1-D mesh (FSDP2), got {placements} on a {mesh.ndim}-D mesh")
    local = t.to_local()
    if isinstance(placements[0], Replicate):
        return Shard(local, 0, None)
    # torch.chunk semantics, as DTensor's Shard(0): ceil(n / world) rows per rank
    rows = t.shape[0]
    per_rank = -(-rows // mesh.size())
    start = min(per_rank * mesh.get_local_rank(), rows)
    return Shard(local, start * (t.numel() // rows if rows else 0), mesh.get_group())


def all_reduce_sums(parts: list[Tensor], groups: list[object]) -> None:
    """Sum every ``parts[i]`` over the ranks of ``groups[i]`` (None: local, nothing to do),
    as one collective per distinct group on a flat concatenation."""
    by_group: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        if group is not None:
            by_group.setdefault(id(group), []).append(i)
    for idx in by_group.values():
        flat = torch.cat([parts[i].reshape(-1) for i in idx])
        torch.distributed.all_reduce(flat, group=groups[idx[0]])
        for i, chunk in zip(idx, flat.split([parts[i].numel() for i in idx])):
            parts[i].copy_(chunk.view_as(parts[i]))


class _Later(NamedTuple):
    parts: Tensor  # this rank's partial sums
    group: object  # the process group to sum them over
    finish: Callable[[Tensor], None]  # what to do with the totals


_LATER: ContextVar[list[_Later] | None] = ContextVar("leanopt_reductions_for_the_end_of_the_step", default=None)


def reduce_later(parts: Tensor, group: object, finish: Callable[[Tensor], None]) -> None:
    """Sum ``parts`` over ``group`` and call ``finish(totals)`` -- at the end of the
    enclosing :func:`batched_reductions` (one collective for every such sum of the step),
    or now, outside one. ``finish`` must not need anything the rest of the step changes."""
    pending = _LATER.get()
    if pending is None:
        _finish([_Later(parts, group, finish)])
    else:
        pending.append(_Later(parts, group, finish))


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
    all_reduce_sums(parts, [item.group for item in pending])
    for item, total in zip(pending, parts):
        item.finish(total)


def all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor holds only finite values; for a DTensor, its whole tensor: every
    rank gets the same answer (one ``all_reduce`` per process group), so that a parameter
    is skipped on all ranks or on none. One synchronization for the list."""
    if not tensors:
        return []
    bad, groups = [], []
    for t in tensors:
        local = t.to_local() if is_dtensor(t) else t
        bad.append((~torch.isfinite(local)).any().to(torch.float32).reshape(1))
        groups.append(_mesh_groups(t))
    for dim in range(max((len(g) for g in groups), default=0)):  # a 2-D mesh reduces over both dimensions
        all_reduce_sums(bad, [g[dim] if dim < len(g) else None for g in groups])
    return [x == 0 for x in torch.cat([b.to(bad[0].device) for b in bad]).tolist()]


def _mesh_groups(t: Tensor) -> list[object]:
    """The process groups of every mesh dimension along which DTensor ``t`` is sharded."""
    if not is_dtensor(t):
        return []
    from torch.distributed.tensor import Shard as ShardPlacement

    mesh = t.device_mesh
    return [mesh.get_group(d) for d, pl in enumerate(t.placements) if isinstance(pl, ShardPlacement)]
