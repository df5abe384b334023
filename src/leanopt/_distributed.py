"""Sharded parameters (FSDP2's ``fully_shard``, DTensor) in the functional cores.

Elementwise math runs on each rank's local shard. A statistic that spans more than one
element (an Adam-mini block mean) is computed from every rank's partial sums, gathered
with *one* ``all_reduce`` per parameter group and step, whatever the number of blocks
and tensors. Nothing here needs a process group when no parameter is a DTensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Shard", "is_dtensor", "row_shard", "all_reduce_sums", "all_finite"]


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
