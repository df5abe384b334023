"""The one router of a step: which backend updates which tensor.

Every optimizer family has up to three implementations of the same update, each over
lists of tensors (*columns*: params, grads, each state, the per-tensor coefficient
records, ...), called as ``fn(*columns, **options)``:

* the **eager** reference: the functional core, torch operations per tensor;
* **compiled** kernels (:mod:`leanopt._compile`, ``torch.compile``): one pass over each
  tensor's memory (two with a mask), the path for CUDA;
* **native** C kernels (:mod:`leanopt._native`): CPU, float32 and bfloat16, one call for
  every tensor of the step.

``fused`` (a hyperparameter of every leanopt optimizer) chooses, per tensor:

* ``None`` (default): the fastest correct path: native where the family's C kernel takes
  the tensor, compiled on CUDA, eager elsewhere (float64, non-contiguous tensors, a shard
  whose step needs a statistic across shards that the family's ``sharded`` C step does not
  take, a machine where the C kernels cannot be built -- warned once, with the cause);
* ``True``: a fast kernel for every tensor, native where it can, compiled otherwise; a
  tensor no kernel takes (a non-contiguous view, such a shard) is an error naming it;
* ``False``: the eager reference, everywhere.

Sharded parameters (DTensors: FSDP2, tensor parallelism, both) are stepped as their local
tensors: every backend sees plain tensors. A step that is elementwise runs on any backend;
one with a statistic across elements (Adam-mini's blocks, the mask's sums) runs on the
family's ``sharded`` C step where it has one (CPU, float32/bfloat16: a C pass for the local
part of the statistic, one collective, a C pass for the update), on its compiled kernels
with the same collective (CUDA; ``fused=True`` elsewhere), else eager, each given
``pieces`` (:class:`leanopt._distributed.Piece`, one per tensor, None for a plain one)
telling it which elements it holds and which process groups hold the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from . import _native
from ._distributed import Piece, is_dtensor, local, piece_of

__all__ = ["Backends", "EAGER", "COMPILED", "NATIVE", "SHARDED", "COMPACT", "COMPILED_COMPACT", "route", "every_row"]

EAGER, COMPILED, NATIVE = "eager", "compiled", "native"
SHARDED = "native-sharded"  # the C step of shards with a statistic across them (Backends.sharded)
COMPACT = "native-compact"  # the C step over int8/int4 state in one pass (Backends.compact)
COMPILED_COMPACT = "compiled-compact"  # the compiled step over compact state (Backends.compiled_compact)


@dataclass(frozen=True)
class Backends:
    """One family's implementations of its step, each ``fn(*columns, **options)``.

    ``streams``: how many leading columns hold the tensors a kernel reads as memory (the
    parameter, its gradient and state; None entries allowed). ``native_takes(row,
    options)``: whether the C kernel takes one tensor's case (``row``: that index of every
    column); the router adds the checks every kernel needs (device, dtype, layout)."""

    streams: int
    eager: Callable[..., None]
    compiled: Callable[..., None]
    native: Callable[..., None] | None = None
    native_takes: Callable[[Sequence[Any], dict[str, Any]], bool] | None = None
    # whether the step with these options is elementwise (a shard then takes any backend)
    elementwise: Callable[[dict[str, Any]], bool] | None = None
    # the C step over int8/int4 state in one pass (state columns hold leanopt._native.CompactState
    # entries; LeanOptimizer._route picks the tensors it takes): for the rows compact_takes(row,
    # options) accepts, by default those of an elementwise step
    compact: Callable[..., None] | None = None
    compact_takes: Callable[[Sequence[Any], dict[str, Any]], bool] | None = None
    compact_formats: tuple[str, ...] = ("int8", "int4", "bf16")  # the stored formats ``compact`` reads
    # whether ``compiled`` takes compact state too (CompactState entries in its state columns,
    # decoded and encoded inside its kernels: leanopt.precision.CompactKernel), the path of
    # compact state on CUDA, and on the CPU under fused=True where the C kernels are not built
    compiled_compact: bool = False
    # the C step of shards whose step takes a statistic across the shards (Adam-mini's block
    # sums, the mask's sums), called with ``pieces`` as the eager path is: C passes over the
    # local tensors, the statistics summed over the pieces' groups between them (one collective
    # per group per call); for the rows sharded_takes(row, options) accepts (default: all)
    sharded: Callable[..., None] | None = None
    sharded_takes: Callable[[Sequence[Any], dict[str, Any]], bool] | None = None
    # the rows of such shards ``compiled`` takes too, given ``pieces`` as ``sharded`` is (CUDA,
    # and fused=True where the C step does not take them); None: none
    compiled_shards: Callable[[Sequence[Any], dict[str, Any]], bool] | None = None


def every_row(row: Sequence[Any], options: dict[str, Any]) -> bool:
    """A ``*_takes`` that takes every row."""
    return True


def _plan(fused: bool | None, columns: Sequence[Sequence[Any]], backends: Backends, options: dict[str, Any],
          name_of: Callable[[int], str], pieces: list[Piece | None] | None) -> dict[str, list[int]]:
    plan: dict[str, list[int]] = {EAGER: [], COMPILED: [], NATIVE: [], SHARDED: []}
    if fused is False:
        plan[EAGER] = list(range(len(columns[0])))
        return plan
    elementwise = backends.elementwise is not None and backends.elementwise(options)
    for i in range(len(columns[0])):
        row = [col[i] for col in columns]
        tensors = [t for t in row[:backends.streams] if t is not None]
        if pieces is not None and pieces[i] is not None and pieces[i].groups and not elementwise:
            # a statistic across the shards: every rank must take the same path, as their collectives pair up.
            # So the choice rests on what the ranks share (family, options, dtype, device, whether the C
            # kernels load on every rank), never on a local part's layout (route steps a non-contiguous one
            # through a contiguous copy)
            if (backends.sharded is not None and _native.kernel_dtype(*tensors)
                    and (backends.sharded_takes is None or backends.sharded_takes(row, options)) and _native.everywhere()):
                plan[SHARDED].append(i)
            elif (backends.compiled_shards is not None and backends.compiled_shards(row, options)
                  and (fused or tensors[0].device.type == "cuda")):
                plan[COMPILED].append(i)
            elif fused:
                raise ValueError(f"fused=True: no fast kernel takes parameter {name_of(i)!r}: it is a shard of a sharded "
                                 "tensor whose step takes a statistic across the shards; use fused=None (the default) to "
                                 "run such tensors on the eager path")
            else:
                plan[EAGER].append(i)
        elif not all(t.is_contiguous() for t in tensors):
            if fused:
                what = "not contiguous in memory" if not tensors[0].is_contiguous() else "held in a non-contiguous state tensor"
                raise ValueError(f"fused=True: no fast kernel takes parameter {name_of(i)!r}: it is {what}; "
                                 f"use fused=None (the default) to run such tensors on the eager path")
            plan[EAGER].append(i)
        elif (backends.native is not None and _native.supports(*tensors)
              and (backends.native_takes is None or backends.native_takes(row, options))):
            plan[NATIVE].append(i)
        elif fused or tensors[0].device.type == "cuda":
            plan[COMPILED].append(i)
        else:
            plan[EAGER].append(i)
    if plan[NATIVE] and _native.library() is None:  # not buildable here (warned once) or turned off
        plan[COMPILED if fused else EAGER].extend(plan[NATIVE])
        plan[NATIVE] = []
    return {backend: sorted(idx) for backend, idx in plan.items()}


def _contiguous(fn: Callable[..., None], columns: Sequence[Sequence[Any]], streams: int, **options: Any) -> None:
    """``fn(*columns, **options)`` with every non-contiguous tensor of the first ``streams``
    columns replaced by a contiguous copy, copied back after (a shard's local part a kernel
    cannot take as it is: rare, and the ranks must not choose their path by it)."""
    moved = []
    columns = [list(col) for col in columns]
    for col in columns[:streams]:
        for j, t in enumerate(col):
            if isinstance(t, Tensor) and not t.is_contiguous():
                col[j] = t.contiguous()
                moved.append((t, col[j]))
    fn(*columns, **options)
    for original, copy in moved:
        original.copy_(copy)


def route(backends: Backends, fused: bool | None, columns: Sequence[Sequence[Any]], options: dict[str, Any],
          name_of: Callable[[int], str] = str) -> dict[str, int]:
    """Run one step of a family: each tensor (index of the columns) on the backend
    ``fused`` chooses for it (module docstring); returns how many tensors each took.
    ``name_of(i)``: the name of tensor ``i``'s parameter, for errors."""
    pieces = None
    if any(is_dtensor(p) for p in columns[0]):
        pieces = [piece_of(p, name_of(i)) for i, p in enumerate(columns[0])]
        for i, (p, g) in enumerate(zip(columns[0], columns[1])):  # the gradient's local part must line up
            if is_dtensor(p) and (not is_dtensor(g) or tuple(g.placements) != tuple(p.placements)):
                raise ValueError(f"leanopt: the gradient of parameter {name_of(i)!r} is placed "
                                 f"{tuple(g.placements) if is_dtensor(g) else 'as a plain tensor'}, the parameter "
                                 f"{tuple(p.placements)}; redistribute the gradient like its parameter")
        columns = [[local(t) if isinstance(t, Tensor) else t for t in col] for col in columns]
    plan = _plan(fused, columns, backends, options, name_of, pieces)
    run = {EAGER: backends.eager, COMPILED: backends.compiled, NATIVE: backends.native, SHARDED: backends.sharded}
    for backend in (NATIVE, SHARDED, COMPILED, EAGER):
        idx = plan[backend]
        if idx:
            whole = len(idx) == len(columns[0])
            takes_pieces = backend in (EAGER, SHARDED) or (backend == COMPILED and backends.compiled_shards is not None)
            extra = {"pieces": [pieces[i] for i in idx]} if takes_pieces and pieces is not None else {}
            cols = [col if whole else [col[i] for i in idx] for col in columns]
            if extra and backend != EAGER:
                _contiguous(run[backend], cols, backends.streams, **options, **extra)
            else:
                run[backend](*cols, **options, **extra)
    return {b: len(i) for b, i in plan.items() if i}
