"""Adam-mini's blocks as data: :class:`BlockLayout` (a tensor viewed as lanes grouped into
blocks) and the block algebra the optimizer step needs -- the sums of g² per lane and per
block, the elements per block, one value per block spread back over its lanes."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._distributed import row_shard
from .._optimizer import finite_terms

__all__ = ["BlockLayout", "BlockView", "lane_to_block", "block_mean_sq", "partial_lane_sq", "block_lane_sq", "block_sums",
           "block_elements", "expand_blocks"]


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor's elements are grouped into blocks.

    The tensor (row-major) is viewed as ``view = (rows, cols)``. ``axis`` is the view
    dimension whose entries are *lanes*; the other dimension is averaged over. Lanes are
    grouped, in order, by ``segments``: each ``(length, lanes_per_block)`` run of
    ``length`` lanes forms ``length // lanes_per_block`` blocks.
    """

    view: tuple[int, int]
    axis: int
    segments: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValueError(f"axis must be 0 or 1, got {self.axis}")
        if sum(n for n, _ in self.segments) != self.view[self.axis]:
            raise ValueError(f"segments {self.segments} do not cover the {self.view[self.axis]} lanes of {self.view}")
        for n, k in self.segments:
            if k <= 0 or n % k:
                raise ValueError(f"segment of {n} lanes cannot be split into blocks of {k}")

    @property
    def lanes(self) -> int:
        return self.view[self.axis]

    @property
    def lane_size(self) -> int:
        """Elements averaged per lane."""
        return self.view[1 - self.axis]

    @property
    def numel(self) -> int:
        return self.view[0] * self.view[1]

    @property
    def n_blocks(self) -> int:
        return sum(n // k for n, k in self.segments)

    @property
    def uniform(self) -> int | None:
        """Lanes per block if every block has the same number of lanes, else None."""
        sizes = {k for _, k in self.segments}
        return sizes.pop() if len(sizes) == 1 else None

    # constructors ------------------------------------------------------------------
    @staticmethod
    def whole(numel: int) -> BlockLayout:
        return BlockLayout((1, numel), 0, ((1, 1),))

    @staticmethod
    def element(numel: int) -> BlockLayout:
        return BlockLayout((numel, 1), 0, ((numel, 1),))

    @staticmethod
    def per_lane(shape: torch.Size | tuple[int, ...], axis: int = 0) -> BlockLayout:
        """One block per output lane: a row (axis 0) or, of a 2-D weight, a column (axis 1)."""
        n = shape[axis] if len(shape) == 2 else shape[0]
        return BlockLayout.lanes_of(shape, axis, ((n, 1),))

    @staticmethod
    def lanes_of(shape: torch.Size | tuple[int, ...], axis: int, segments: tuple[tuple[int, int], ...]) -> BlockLayout:
        """Blocks along the output dimension of a 2-D weight (axis 0: rows, 1: columns)."""
        if len(shape) == 1:  # a vector's lanes are its elements
            return BlockLayout((shape[0], 1), 0, segments)
        rows = shape[0]
        cols = math.prod(shape[1:])
        return BlockLayout((rows, cols), axis, segments)


@functools.lru_cache(maxsize=4096)
def _lane_to_block(layout: BlockLayout) -> tuple[Tensor, Tensor]:
    """CPU tensors: block id of every lane, and element count of every block."""
    ids, counts, b = [], [], 0
    for n, k in layout.segments:
        nb = n // k
        ids.append(torch.arange(b, b + nb).repeat_interleave(k))
        counts.append(torch.full((nb,), float(k * layout.lane_size), dtype=torch.float64))
        b += nb
    return torch.cat(ids), torch.cat(counts)


@functools.lru_cache(maxsize=4096)
def lane_to_block(layout: BlockLayout, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_lane_to_block` on ``device`` (cached: no copy per step)."""
    ids, counts = _lane_to_block(layout)
    return ids.to(device), counts.to(device=device, dtype=dtype)


def block_mean_sq(g: Tensor, layout: BlockLayout, dtype: torch.dtype) -> Tensor:
    """``mean(g²)`` over every block, as a ``(n_blocks,)`` tensor of ``dtype``."""
    return block_sums(partial_lane_sq(g, layout, dtype), layout) / block_elements(layout, g.device, dtype)


def partial_lane_sq(g: Tensor, layout: BlockLayout, dtype: torch.dtype, flat_offset: int = 0) -> Tensor:
    """Sum of g² per lane of ``layout`` over the elements ``g`` holds: the whole tensor
    (``flat_offset=0``), or one rank's contiguous shard starting at ``flat_offset`` (whose
    lanes outside the shard get 0, so the ranks' results add up to the full sums)."""
    rows, cols = layout.view
    if flat_offset == 0 and g.numel() == layout.numel:
        return block_lane_sq(g.reshape(layout.view), layout.axis, dtype)
    out = torch.zeros(layout.lanes, dtype=dtype, device=g.device)
    if layout.axis == 0 and rows == 1:  # one lane, the whole tensor
        out[:] = block_lane_sq(g.reshape(1, -1), 0, dtype)
        return out
    if flat_offset % cols or g.numel() % cols:
        raise ValueError(f"a shard starting at element {flat_offset} with {g.numel()} elements does not hold whole rows "
                         f"of the {layout.view} block view; shard parameters along dim 0")
    part = block_lane_sq(g.reshape(-1, cols), layout.axis, dtype)
    if layout.axis == 1:  # every row holds a part of every lane (column)
        return part
    start = flat_offset // cols
    out[start:start + part.numel()] = part
    return out


def block_lane_sq(g2d: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    """Sum of squares per lane of a 2-D view (rows for axis 0, columns for axis 1), of the
    finite squares only (:func:`leanopt._optimizer.finite_terms`): a NaN gradient element
    must not reach the v of its whole block."""
    return finite_terms(g2d.to(dtype).square()).sum(dim=1 - axis)


def block_sums(lane_sq: Tensor, layout: BlockLayout) -> Tensor:
    """Per-lane sums → per-block sums."""
    k = layout.uniform
    if k is not None:  # contiguous equal blocks: a reshape, no index arithmetic
        return lane_sq.view(-1, k).sum(1) if k > 1 else lane_sq
    ids, _ = lane_to_block(layout, lane_sq.device, lane_sq.dtype)
    return torch.zeros(layout.n_blocks, device=lane_sq.device, dtype=lane_sq.dtype).index_add_(0, ids, lane_sq)


def block_elements(layout: BlockLayout, device: torch.device, dtype: torch.dtype) -> Tensor | float:
    """Elements per block (a number when all blocks are equal)."""
    k = layout.uniform
    if k is not None:
        return float(k * layout.lane_size)
    return lane_to_block(layout, device, dtype)[1]


def expand_blocks(block_values: Tensor, layout: BlockLayout) -> Tensor:
    """One value per block → a tensor broadcastable against ``view`` (one value per lane)."""
    k = layout.uniform
    if k is not None:
        lane = block_values if k == 1 else block_values.repeat_interleave(k)
    else:
        ids, _ = lane_to_block(layout, block_values.device, block_values.dtype)
        lane = block_values.index_select(0, ids)
    return lane.view(-1, 1) if layout.axis == 0 else lane.view(1, -1)


class BlockView:
    """One parameter's blocks as this process holds them: the whole tensor, or its FSDP2
    shard (whole rows of ``layout.view`` from element ``offset`` on). The optimizer step
    asks it for the block sums of g² (a shard gives its part, which ``group`` adds up),
    and for ``m`` scaled by one value per block, without a full-size temporary."""

    def __init__(self, p: Tensor, layout: BlockLayout) -> None:
        shard = row_shard(p)
        self.layout = layout
        self.sharded = shard is not None
        self.offset = 0 if shard is None else shard.flat_offset
        self.group = None if shard is None else shard.group

    @property
    def shard_of(self) -> tuple[int, object] | None:
        """``(elements of the whole tensor, process group)`` of a shard, else None."""
        return (self.layout.numel, self.group) if self.sharded else None

    def local(self, t: Tensor) -> Tensor:
        """This process's elements of ``t`` (a parameter, its gradient or state)."""
        return t.to_local() if self.sharded and hasattr(t, "to_local") else t

    def sq_sums(self, g: Tensor, dtype: torch.dtype) -> Tensor:
        """Sum of g² per block over the elements held here (``dtype``: the accumulation's)."""
        return block_sums(partial_lane_sq(self.local(g), self.layout, dtype, self.offset), self.layout)

    def means(self, sums: Tensor) -> Tensor:
        """Whole-tensor block sums → block means."""
        return sums / block_elements(self.layout, sums.device, sums.dtype)

    def _rows(self, t: Tensor, block_values: Tensor) -> tuple[Tensor, Tensor]:
        # a contiguous local t as a 2-D view, and one value per lane that broadcasts against it
        lane = expand_blocks(block_values, self.layout).to(t.dtype)
        rows, cols = self.layout.view
        if not self.sharded:
            return t.view(self.layout.view), lane
        if self.layout.axis == 0 and rows == 1:  # a shard of a one-block tensor: a single scale
            return t.view(1, -1), lane.reshape(1, 1)
        if self.layout.axis == 0:  # the shard's lanes are its rows
            start = self.offset // cols
            lane = lane[start:start + t.numel() // cols]
        return t.view(-1, cols), lane

    def scaled(self, m: Tensor, block_values: Tensor) -> Tensor:
        """``m`` (local) times its block's value, shaped as ``m``."""
        m2, lane = self._rows(m.contiguous(), block_values)
        return (m2 * lane).view(m.shape)

    def sub_scaled_(self, p: Tensor, m: Tensor, block_values: Tensor) -> None:
        """``p -= m · value of its block`` (local tensors), without a full-size temporary."""
        if not p.is_contiguous():  # rare (a transposed view registered as a parameter): one temporary is unavoidable
            p.sub_(self.scaled(m, block_values).view(p.shape))
            return
        m2, lane = self._rows(m, block_values)
        self._rows(p, block_values)[0].addcmul_(m2, lane, value=-1.0)
