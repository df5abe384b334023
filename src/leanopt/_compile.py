"""Compiled fast paths: one ``torch.compile``d kernel per optimizer.

Each optimizer's fast path is a small function over *lists* of tensors, written with
tensor ops, whose scalars arrive as one ``[n_tensors, k]`` tensor of per-tensor rows.
Inductor turns it into one C++ (CPU) or Triton (GPU) loop per tensor and pass — one pass
for an elementwise step, two where a per-tensor or per-block sum is needed first —
without full-size temporaries, all called from one generated wrapper. A step makes a few
such calls (:func:`fusable_groups`), not one per tensor, and a scheduler changing ``lr``
never triggers a recompilation. Shapes are dynamic, so a compiled graph serves tensors of
every size.

Where compilation is unavailable or fails, the kernel warns once and runs eagerly:
results are the same, only slower.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["Kernel", "hyper", "field_index", "fusable_groups"]

# every parameter set (model) is one more compiled variant of a kernel; dynamo's default
# of 8 per function would send the ninth model to the slow eager path
_RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def _outer_loop_fusion_fix() -> Iterator[None]:
    """Work around a bug of inductor's CPU outer-loop fusion, while our kernels compile.

    That fusion puts a per-row reduction and the update of the same row in one loop (so
    Adam-mini's block sums and its update read memory once). Deciding which buffers can
    live per row, it asks every user of a buffer for the index it reads, including users
    that only order a later in-place write and read nothing: ``KeyError`` (torch 2.13).
    Such a user reads nothing, so "not a row-local buffer" (None) is the right answer.
    """
    try:
        from torch._inductor.loop_body import LoopBody
    except ImportError:  # no inductor: nothing to fix
        yield
        return
    original = LoopBody.get_read_expr

    def get_read_expr(self: Any, buffer_name: str) -> Any:
        try:
            return original(self, buffer_name)
        except KeyError:
            return None

    LoopBody.get_read_expr = get_read_expr
    try:
        yield
    finally:
        LoopBody.get_read_expr = original


class Kernel:
    """A lazily compiled function with an eager fallback."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._failed:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            # dynamic_threads: the parallel loops are chosen at run time, not from the sizes
            # of the first call (a graph first compiled for small tensors would otherwise
            # run single-threaded on large ones)
            self._compiled = torch.compile(self.fn, dynamic=True, options={"cpp.dynamic_threads": True})
        try:
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT), _outer_loop_fusion_fix():
                return self._compiled(*args, **kwargs)
        except Exception as e:  # no compiler, unsupported backend, ...
            self._failed = True
            warnings.warn(
                f"leanopt: compiling the fused step ({self.fn.__name__}) failed, falling back to the eager "
                f"implementation ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(*args, **kwargs)


def hyper(records: Sequence[Sequence[float]], like: Tensor) -> Tensor:
    """The step's scalars, one record (a family's step ``NamedTuple``) per row, as a tensor
    (``float64`` for ``float64`` parameters); a kernel reads a field as ``h[F.name]`` with
    ``F = field_index(Record)``."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor([tuple(map(float, r)) for r in records], dtype=dtype, device=like.device)


R = TypeVar("R", bound=tuple)


def field_index(record: type[R]) -> R:
    """The record whose every field holds its own column: ``field_index(AdamStep).lr`` is
    the column of ``lr`` in :func:`hyper`'s rows."""
    return record(*range(len(record._fields)))  # type: ignore[attr-defined]


# list lengths of one call: every call is one of these few shapes of graph, so a handful of
# compilations per kernel serve every model (and tests and benchmarks share them)
_CHUNKS = (16, 8, 4, 2, 1)


def fusable_groups(params: Sequence[Tensor], key: Callable[[int], Any] | None = None) -> list[list[int]]:
    """Index lists for the calls of a kernel.

    A call gets tensors of one device, dtype and size (plus ``key(i)``, e.g. a layout),
    at most 16 and a power-of-two count of them: with dynamic shapes, one compiled graph
    then serves every call of that count, whatever the size, so a model costs a few
    compilations instead of one graph as large as the model, and the Python cost per step
    is a few calls. Kernels work on flattened views: the router (:mod:`leanopt._backend`)
    sends them contiguous, unsharded tensors only.
    """
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, p.numel(), key(i) if key else None), []).append(i)
    calls = []
    for idx in groups.values():
        start = 0
        for size in _CHUNKS:
            while len(idx) - start >= size:
                calls.append(idx[start:start + size])
                start += size
    return calls
