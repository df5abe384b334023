"""The thin `torch.optim.Optimizer` layer every leanopt optimizer shares.

An optimizer here is a functional core (a function over lists of tensors, in the
optimizer's own module) plus a subclass of :class:`LeanOptimizer` that validates the
hyperparameters, creates state lazily and calls the core once per parameter group.
This module holds what is common to all of them:

* parameter input in every form `torch.optim` accepts, plus ``(name, param)`` pairs
  (``model.named_parameters()``), also inside param-group dicts; names are kept for
  error messages and reports, and never enter ``state_dict()``;
* declarative hyperparameter validation with errors that name the argument and the
  allowed range, applied to the defaults and to every param group, including groups
  added later with ``add_param_group``;
* the ``step(closure)`` skeleton: the closure runs exactly once, with grad enabled;
* the rejection of sparse gradients.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["LeanOptimizer", "Interval", "IntAtLeast", "OneOf", "Betas", "ParamsT"]

ParamsT = Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]]


# --------------------------------------------------------------------------------------
# Hyperparameter checks
# --------------------------------------------------------------------------------------


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


@dataclass(frozen=True)
class Interval:
    """A real interval; ``low_open``/``high_open`` exclude the end points."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        left = "(" if self.low_open or self.low == -math.inf else "["
        right = ")" if self.high_open or self.high == math.inf else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def check(self, name: str, value: Any) -> None:
        x = _as_float(name, value)
        below = x <= self.low if self.low_open else x < self.low
        above = x >= self.high if self.high_open else x > self.high
        if below or above or math.isinf(x):
            raise ValueError(f"Invalid {name}: {x!r}; {name} must be in {self.describe()}")


@dataclass(frozen=True)
class OneOf:
    choices: tuple[Any, ...]

    def check(self, name: str, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"Invalid {name}: {value!r}; {name} must be one of {', '.join(map(repr, self.choices))}")


@dataclass(frozen=True)
class Betas:
    """A pair of coefficients, each checked against ``interval``."""

    interval: Interval = Interval(0.0, 1.0, high_open=True)

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"Invalid {name}: {value!r}; {name} must be a pair of floats")
        for i, b in enumerate(value):
            self.interval.check(f"{name}[{i}]", b)


@dataclass(frozen=True)
class IntAtLeast:
    low: int

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < self.low:
            raise ValueError(f"Invalid {name}: {value!r}; {name} must be an int >= {self.low}")


class _Bool:
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r}; {name} must be True or False")


BOOL = _Bool()
NONNEG = Interval(0.0)
POSITIVE = Interval(0.0, low_open=True)


# --------------------------------------------------------------------------------------
# Parameter input
# --------------------------------------------------------------------------------------


def _split_named(params: Iterable[Any], names: dict[Tensor, str], where: str) -> list[Tensor]:
    """Strip ``(name, param)`` pairs to params, recording the names."""
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, tuple):
            if len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], Tensor):
                raise TypeError(f"{where}: expected tensors or (name, tensor) pairs, got {item!r:.80}")
            name, p = item
            names.setdefault(p, name)
            out.append(p)
        elif isinstance(item, Tensor):
            out.append(item)
        else:
            raise TypeError(f"{where}: expected tensors or (name, tensor) pairs, got {type(item).__name__}")
    return out


def normalize_params(params: Any) -> tuple[list[dict[str, Any]], dict[Tensor, str]]:
    """Turn any accepted ``params`` argument into plain param-group dicts plus a name map."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, got a Tensor")
    if isinstance(params, Mapping):
        raise TypeError("params must be an iterable of param groups, got a single dict; wrap it in a list")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    names: dict[Tensor, str] = {}
    if all(isinstance(i, Mapping) for i in items):
        groups = []
        for k, g in enumerate(items):
            g = dict(g)
            if "params" not in g:
                raise ValueError(f"param group {k} has no 'params' entry")
            ps = g["params"]
            ps = [ps] if isinstance(ps, Tensor) else list(ps)
            g["params"] = _split_named(ps, names, f"param group {k}")
            groups.append(g)
        return groups, names
    if any(isinstance(i, Mapping) for i in items):
        raise TypeError("params mixes param-group dicts with tensors")
    return [{"params": _split_named(items, names, "params")}], names


# --------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------


class LeanOptimizer(torch.optim.Optimizer):
    """Base class of leanopt's optimizers.

    Subclasses declare ``_checks``, a mapping from hyperparameter name to a checker
    (``Interval``, ``OneOf``, ``Betas``, ...), and implement ``_update()``, which runs after
    the closure inside ``torch.no_grad()``.
    """

    _checks: dict[str, Any] = {}
    # hyperparameters a variant adds to its parent's (PMA's period and variant): set by the
    # variant's __init__ before it calls the parent's, which puts them into the defaults
    _extra_defaults: dict[str, Any] = {}

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        groups, names = normalize_params(params)
        self._validate(defaults, "")
        self._param_names: dict[Tensor, str] = names
        super().__init__(groups, defaults)

    # -- validation ---------------------------------------------------------------------
    def _validate(self, hyper: Mapping[str, Any], where: str) -> None:
        for key, check in self._checks.items():
            if key in hyper:
                try:
                    check.check(key, hyper[key])
                except ValueError as e:
                    raise ValueError(f"{type(self).__name__}: {e}{where}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # groups passed after construction may carry (name, param) pairs too
        if "params" in param_group and not isinstance(param_group["params"], Tensor):
            param_group = dict(param_group)
            names = getattr(self, "_param_names", {})
            param_group["params"] = _split_named(list(param_group["params"]), names, "add_param_group")
        self._validate(param_group, f" (in param group {len(self.param_groups)})")
        for p in param_group["params"] if not isinstance(param_group["params"], Tensor) else [param_group["params"]]:
            if not p.is_floating_point() and not p.is_complex():
                raise ValueError(f"{type(self).__name__} can only optimize floating-point tensors, got {p.dtype}")
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; a subclass's own
        # attributes (names, Adam-mini's partition) must survive deepcopy and pickling too.
        # The hook dicts stay out, as in torch (they may hold unpicklable closures).
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    # -- names --------------------------------------------------------------------------
    def param_name(self, p: Tensor) -> str:
        """The name given for ``p`` (from named parameters or the model), else its position."""
        name = self._param_names.get(p)
        if name is not None:
            return name
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}][{pi}]"
        return "<unknown parameter>"

    # -- stepping -----------------------------------------------------------------------
    def _grads(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Params of ``group`` that have a gradient, and those gradients (sparse rejected)."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter {self.param_name(p)!r}); use a dense embedding (sparse=False)"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss;
                it is called exactly once, with gradients enabled, before the update.
        """
        from .mask import sharded_mask_sums  # (mask.py builds on this module)

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with sharded_mask_sums():
            self._update()
        return loss

    def _update(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` that points at the first caller outside
    leanopt and torch (the user's line), however deep the warning is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def step_tensor() -> Tensor:
    """A fresh per-parameter step counter, kept on the CPU in float32 like ``torch.optim``."""
    return torch.zeros((), dtype=torch.float32)


def acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype reductions are computed in: at least float32, float64 for float64 tensors."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bias_corrections(beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """Adam's bias corrections at ``step``: ``1 − β1^t`` and ``sqrt(1 − β2^t)``."""
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


def decoupled_decay_(p: Tensor, lr: float | Tensor, weight_decay: float) -> None:
    """Decoupled weight decay (Loshchilov & Hutter): ``p ← p·(1 − lr·wd)``, before the update."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
