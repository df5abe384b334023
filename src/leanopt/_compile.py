"""Compiled fast paths (``fused=True``): one ``torch.compile``d kernel per optimizer.

Each optimizer's fast path is a small function over *one* parameter's tensors, written
with in-place tensor ops, whose hyperparameters arrive as one small tensor: inductor
fuses it into one or two passes over memory (vectorised C++ on the CPU, Triton on the
GPU) without full-size temporaries, and a scheduler changing ``lr`` never triggers a
recompilation. It is compiled with dynamic shapes on first use, so one compilation
serves tensors of every size. Where compilation is unavailable or fails, the kernel
warns once and runs eagerly: results are the same, only slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Kernel", "hyper"]


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
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
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


def hyper(values: list[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The step's scalars as one tensor (``float64`` for ``float64`` parameters)."""
    return torch.tensor(values, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
