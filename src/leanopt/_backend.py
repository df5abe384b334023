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
  the tensor, compiled on CUDA, eager elsewhere (float64, DTensor shards, non-contiguous
  tensors, a machine where the C kernels cannot be built -- warned once, with the cause);
* ``True``: a fast kernel for every tensor, native where it can, compiled otherwise; a
  tensor no kernel takes (a DTensor, a non-contiguous view) is an error naming it;
* ``False``: the eager reference, everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from . import _native
from ._distributed import is_dtensor

__all__ = ["Backends", "EAGER", "COMPILED", "NATIVE", "route"]

EAGER, COMPILED, NATIVE = "eager", "compiled", "native"


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


def _kernel_ready(tensors: Sequence[Tensor]) -> bool:
    """Whether a kernel can take these tensors as flat memory: plain, contiguous tensors
    (DTensor shards take the eager path until the sharded kernels exist)."""
    return all(t.is_contiguous() and not is_dtensor(t) for t in tensors)


def _plan(fused: bool | None, columns: Sequence[Sequence[Any]], backends: Backends, options: dict[str, Any],
          name_of: Callable[[int], str]) -> dict[str, list[int]]:
    plan: dict[str, list[int]] = {EAGER: [], COMPILED: [], NATIVE: []}
    if fused is False:
        plan[EAGER] = list(range(len(columns[0])))
        return plan
    for i in range(len(columns[0])):
        row = [col[i] for col in columns]
        tensors = [t for t in row[:backends.streams] if t is not None]
        if not _kernel_ready(tensors):
            if fused:
                p = tensors[0]
                what = "a DTensor (sharded parameters take the eager path for now)" if is_dtensor(p) else (
                    "not contiguous in memory" if not p.is_contiguous() else "held in a non-contiguous state tensor")
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
    return plan


def route(backends: Backends, fused: bool | None, columns: Sequence[Sequence[Any]], options: dict[str, Any],
          name_of: Callable[[int], str] = str) -> dict[str, int]:
    """Run one step of a family: each tensor (index of the columns) on the backend
    ``fused`` chooses for it (module docstring); returns how many tensors each took.
    ``name_of(i)``: the name of tensor ``i``'s parameter, for errors."""
    plan = _plan(fused, columns, backends, options, name_of)
    run = {EAGER: backends.eager, COMPILED: backends.compiled, NATIVE: backends.native}
    for backend in (NATIVE, COMPILED, EAGER):
        idx = plan[backend]
        if idx:
            whole = len(idx) == len(columns[0])
            run[backend](*(col if whole else [col[i] for i in idx] for col in columns), **options)
    return {b: len(i) for b, i in plan.items() if i}
