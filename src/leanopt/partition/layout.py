"""Adam-mini's blocks as data: :class:`BlockLayout` (a tensor viewed as lanes grouped into
blocks) and the block algebra the optimizer step needs -- the sums of g² per lane and per
block, the elements per block, one value per block spread back over its lanes."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._distributed import Piece, remember
from .._optimizer import finite_terms

__all__ = ["BlockLayout", "BlockView", "lane_to_block", "block_mean_sq", "block_lane_sq", "block_sums",
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
    return block_sums(block_lane_sq(g.reshape(layout.view), layout.axis, dtype), layout) / block_elements(layout, g.device, dtype)


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
    """One parameter's blocks as this process holds them: the whole tensor, or its part of
    a DTensor (a :class:`leanopt._distributed.Piece`: FSDP2 rows, tensor-parallel columns,
    both on a 2-D mesh, split evenly or not). The optimizer step asks it for the block sums
    of g² (a part gives its share, which ``groups`` add up) and for ``m`` scaled by one
    value per block, without a full-size temporary.

    A part is viewed as a 2-D ``(local rows, local cols)`` tensor whose lanes are given by
    ``lane_ids``: the lane of :attr:`layout` (a row or a column of ``layout.view``) of each
    local row (axis 0) or column (axis 1)."""

    def __init__(self, layout: BlockLayout, piece: Piece | None = None, name: str = "a parameter") -> None:
        self.layout = layout
        self.groups = piece.groups if piece is not None else ()
        self.local_view: tuple[int, int] = layout.view
        self.lane_ids: Tensor | None = None  # None: the whole tensor, lane i is row/column i
        if piece is not None:
            self.local_view, self.lane_ids = _local_lanes(layout, piece, name)

    def row_runs(self) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]:
        """The local rows (an axis-0 layout) in runs: ``(r0, r1, b0, b1)``, rows ``r0..r1``
        hold blocks ``b0..b1`` whole and in order (every element of them is here, so a
        one-pass kernel can step them from ``v[b0:b1]``; equal blocks only), and ``(r0, r1)``,
        the other rows (of blocks whose other parts other processes hold)."""
        rows, layout, k = self.local_view[0], self.layout, self.layout.uniform
        whole = []
        if rows and k is not None and layout.axis == 0 and self.local_view[1] == layout.view[1]:
            ids = torch.arange(rows) if self.lane_ids is None else self.lane_ids
            breaks = (torch.nonzero(ids[1:] != ids[:-1] + 1).flatten() + 1).tolist()
            for r0, r1 in zip([0, *breaks], [*breaks, rows]):  # runs of consecutive lanes
                first, end = int(ids[r0]), int(ids[r1 - 1]) + 1
                b0, b1 = -(-first // k), end // k  # the blocks wholly inside the run
                if b1 > b0:
                    whole.append((r0 + b0 * k - first, r0 + b1 * k - first, b0, b1))
        other, at = [], 0
        for r0, r1, _, _ in whole:
            if r0 > at:
                other.append((at, r0))
            at = r1
        if rows > at:
            other.append((at, rows))
        return whole, other

    def _ids(self, device: torch.device) -> Tensor:
        """:attr:`lane_ids` on ``device``, copied there once."""
        if self.lane_ids.device != device:
            self.lane_ids = self.lane_ids.to(device)
        return self.lane_ids

    def sq_sums(self, g: Tensor, dtype: torch.dtype) -> Tensor:
        """Sum of g² per block over the elements held here (``dtype``: the accumulation's)."""
        return self.lane_sums(block_lane_sq(g.reshape(self.local_view), self.layout.axis, dtype))

    def lane_sums(self, part: Tensor) -> Tensor:
        """Sums per local lane (a row or column of :attr:`local_view`) → sums per block of
        the whole tensor (this process's share of them)."""
        if self.lane_ids is not None:
            part = torch.zeros(self.layout.lanes, dtype=part.dtype, device=part.device).index_add_(0, self._ids(part.device), part)
        return block_sums(part, self.layout)

    def means(self, sums: Tensor) -> Tensor:
        """Whole-tensor block sums → block means."""
        return sums / block_elements(self.layout, sums.device, sums.dtype)

    def lane_values(self, block_values: Tensor, dtype: torch.dtype) -> Tensor:
        """One value per block → one per local lane, in order (1-D, ``dtype``)."""
        lane = expand_blocks(block_values, self.layout).to(dtype).reshape(-1)
        return lane if self.lane_ids is None else lane.index_select(0, self._ids(lane.device))

    def _lane(self, block_values: Tensor, dtype: torch.dtype) -> Tensor:
        # one value per local lane, broadcasting against the local 2-D view
        lane = self.lane_values(block_values, dtype)
        return lane.view(-1, 1) if self.layout.axis == 0 else lane.view(1, -1)

    def scaled(self, m: Tensor, block_values: Tensor) -> Tensor:
        """``m`` (local) times its block's value, shaped as ``m``."""
        return (m.contiguous().view(self.local_view) * self._lane(block_values, m.dtype)).view(m.shape)

    def sub_scaled_(self, p: Tensor, m: Tensor, block_values: Tensor) -> None:
        """``p -= m · value of its block`` (local tensors), without a full-size temporary."""
        if not p.is_contiguous():  # rare (a transposed view registered as a parameter): one temporary is unavoidable
            p.sub_(self.scaled(m, block_values).view(p.shape))
            return
        p.view(self.local_view).addcmul_(m.contiguous().view(self.local_view), self._lane(block_values, p.dtype), value=-1.0)


def _split(shape: tuple[int, ...], rows: int) -> tuple[int, int] | None:
    """``(k, q)`` with ``rows = prod(shape[:k]) · q`` and ``q`` dividing ``shape[k]``: where
    the block view's rows end among the tensor's dimensions (``q = 1``: between two). None
    if the view's rows do not line up with the dimensions."""
    before = 1
    for k, n in enumerate(shape):
        if rows == before:
            return k, 1
        if rows % before == 0 and n % (rows // before) == 0:
            return (k + 1, 1) if rows // before == n else (k, rows // before)
        before *= n
    return (len(shape), 1) if rows == before else None


def _combined(shape: tuple[int, ...], index: tuple[Tensor | None, ...], dims: range) -> Tensor:
    """Row-major flat positions, over dimensions ``dims``, of the local elements' indices."""
    flat = torch.zeros(1, dtype=torch.long)
    for d in dims:
        i = torch.arange(shape[d]) if index[d] is None else index[d]
        flat = (flat[:, None] * shape[d] + i[None, :]).reshape(-1)
    return flat


def _lanes_of_piece(layout: BlockLayout, shape: tuple[int, ...], index: tuple[Tensor | None, ...]) -> tuple[tuple[int, int], Tensor] | None:
    split = _split(shape, layout.view[0])
    if split is None:
        return None
    k, q = split
    n = len(shape)
    sizes = [shape[d] if index[d] is None else index[d].numel() for d in range(n)]
    a, b, c = math.prod(sizes[:k]), (sizes[k] if k < n else 1), math.prod(sizes[k + 1:])
    if layout.axis == 0:
        rows = _combined(shape, index, range(k))
        if q > 1:  # the view's rows cut dimension k: q of its rows in each of them
            ik = torch.arange(shape[k]) if index[k] is None else index[k]
            rows = (rows[:, None] * q + (ik // (shape[k] // q))[None, :]).reshape(-1)
            return (a * b, c), rows
        return (a, b * c), rows
    if q > 1:
        ik = torch.arange(shape[k]) if index[k] is None else index[k]
        cols = ((ik % (shape[k] // q))[:, None] * math.prod(shape[k + 1:]) + _combined(shape, index, range(k + 1, n))[None, :])
        return (a, b * c), cols.reshape(-1)
    return (a, b * c), _combined(shape, index, range(k, n))


# (layout, id(piece)) -> (piece, result): pieces are cached by _distributed.piece_of, so an
# id stays the same piece (which the entry keeps alive)
_LANES: dict[tuple[BlockLayout, int], tuple[Piece, tuple[tuple[int, int], Tensor] | None]] = {}


def _local_lanes(layout: BlockLayout, piece: Piece, name: str) -> tuple[tuple[int, int], Tensor]:
    key = (layout, id(piece))
    out = _LANES[key][1] if key in _LANES else remember(_LANES, key, (piece, _lanes_of_piece(layout, piece.shape, piece.index)))[1]
    if out is None:
        raise ValueError(f"leanopt: the blocks of parameter {name!r} (a {layout.view} view of its {piece.shape} elements) "
                         "do not line up with its dimensions, so they cannot be reduced across its shards")
    return out
