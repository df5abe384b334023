"""The thin `torch.optim.Optimizer` layer every leanopt optimizer shares.

An optimizer here is a functional core (a function over lists of tensors, in the
optimizer's own module) plus a subclass of :class:`LeanOptimizer` that validates the
hyperparameters, creates state lazily and calls the core once per parameter group.
This module holds what is common to all of them:

* parameter input in every form `torch.optim` accepts — tensors, ``(name, param)`` pairs
  (``model.named_parameters()``, kept in ``param_groups[i]["param_names"]`` as torch
  does) and param-group dicts — and a model, whose trainable parameters are taken with
  their names;
* declarative hyperparameter validation with errors that name the argument and the
  allowed range, applied to the defaults and to every param group, including groups
  added later with ``add_param_group``;
* the ``step(closure)`` skeleton: the closure runs exactly once, with grad enabled;
* loading older checkpoints (Python-number ``step`` entries, missing group keys);
* the rejection of sparse gradients;
* the non-finite gradient rule (``docs/algorithms.md`` §0): :func:`finite_terms` for the
  statistics shared across elements, and the opt-in ``skip_nonfinite``;
* the precision of the state and of the update (:mod:`leanopt.precision`): every family asks
  :meth:`LeanOptimizer._element_state` for its per-element state and gets a tensor to step in
  place, stored back compactly (bf16, int8, int4) after the step; ``stochastic_rounding``
  steps bfloat16 parameters through float32 copies rounded back stochastically.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import precision as _precision
from . import _native
from ._backend import COMPACT, COMPILED_COMPACT, Backends, route
from ._distributed import all_finite, batched_reductions, is_dtensor, rank_zero_ints
from .precision import MOMENT, SECOND

__all__ = ["LeanOptimizer", "Interval", "IntAtLeast", "OneOf", "Betas", "ParamsT", "unwrap_model", "trainable_named_parameters"]

ParamsT = Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]] | nn.Module


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


@dataclass(frozen=True)
class _Bool:
    or_none: bool = False

    def check(self, name: str, value: Any) -> None:
        if not (isinstance(value, bool) or (self.or_none and value is None)):
            raise ValueError(f"Invalid {name}: {value!r}; {name} must be True{', False or None' if self.or_none else ' or False'}")


BOOL = _Bool()
BOOL_OR_NONE = _Bool(or_none=True)  # fused: None (the default) lets the router choose
NONNEG = Interval(0.0)
POSITIVE = Interval(0.0, low_open=True)


# --------------------------------------------------------------------------------------
# Parameter input
# --------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, else the model itself."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` of every parameter of ``model`` that requires grad."""
    named = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    return named


def _split_named(params: list[Any]) -> tuple[list[Any], list[str] | None]:
    """``(name, param)`` pairs → params and names, as ``torch.optim.Optimizer.add_param_group``
    does (names all or none); anything else is left for torch to check."""
    named = [isinstance(item, tuple) for item in params]
    if not any(named):
        return params, None
    if not all(named):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    for item in params:
        if len(item) != 2 or not isinstance(item[0], str):
            raise TypeError(f"expected (name, tensor) pairs, got {item!r:.80}")
    return [p for _, p in params], [n for n, _ in params]


def normalize_params(params: Any) -> list[dict[str, Any]]:
    """Any ``params`` argument ``torch.optim`` accepts, or a model, as param-group dicts;
    names of ``(name, param)`` pairs go to the group's ``"param_names"``, as in torch."""
    if isinstance(params, Tensor):  # torch's own message, which users match on
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
            + torch.typename(params)
        )
    if isinstance(params, nn.Module):
        params = trainable_named_parameters(params)
    if isinstance(params, Mapping):
        raise TypeError("params must be an iterable of param groups, got a single dict; wrap it in a list")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if not all(isinstance(i, Mapping) for i in items):
        if any(isinstance(i, Mapping) for i in items):
            raise TypeError("params mixes param-group dicts with tensors")
        items = [{"params": items}]
    return [_named_group(g) for g in items]


def _named_group(group: Mapping[str, Any]) -> dict[str, Any]:
    group = dict(group)
    if "params" not in group:
        raise ValueError("param group has no 'params' entry")
    ps = group["params"]
    if isinstance(ps, (set, frozenset)):  # torch's refusal, before list() would fix an order that varies between runs
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of tensors "
                        "in sets will change between runs. Please use a list instead.")
    ps = [ps] if isinstance(ps, Tensor) else list(ps)
    group["params"], names = _split_named(ps)
    if names is not None:
        group["param_names"] = names
    return group


# keys any optimizer's groups may carry: torch's, those lr schedulers add, and leanopt's own
_GROUP_KEYS_OF_ANY_OPTIMIZER = {"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum",
                                "max_momentum", "optimizer_class", "nonfinite_skips", "rounding_seed", "rounding_step"}


@contextmanager
def _hooks_set_aside(opt: torch.optim.Optimizer, attr: str):
    """Yields the hooks of ``attr`` (e.g. ``_optimizer_state_dict_post_hooks``) with the
    optimizer's own dict empty meanwhile, so that torch's method leaves them to the caller,
    who runs them at the point torch's order puts them; put back after, the same dict (its
    handles still remove from it)."""
    hooks = getattr(opt, attr)
    setattr(opt, attr, OrderedDict())
    try:
        yield hooks
    finally:
        setattr(opt, attr, hooks)


def _run_hooks(opt: torch.optim.Optimizer, hooks: Mapping[Any, Callable], state_dict: Any) -> Any:
    """``state_dict`` through each of the state-dict ``hooks``, which may return a replacement."""
    for hook in hooks.values():
        out = hook(opt, state_dict)
        if out is not None:
            state_dict = out
    return state_dict


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
    # checks every leanopt optimizer shares, merged under each class's own
    _common_checks: dict[str, Any] = {"skip_nonfinite": BOOL, **_precision.precision_checks()}
    # hyperparameters a variant adds to its parent's (PMA's period and variant): set by the
    # variant's __init__ before it calls the parent's, which puts them into the defaults
    _extra_defaults: dict[str, Any] = {}

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        # hyperparameters first, as torch.optim: AdamW(None, lr=-1) names lr, not params
        self._validate(defaults, "")
        self._group_keys = tuple(defaults)  # the hyperparameters every group must have
        self.last_nonfinite: list[str] = []  # names skip_nonfinite skipped in the latest step
        self.last_backends: dict[str, int] = {}  # tensors per backend in the latest step
        self._stores: list[tuple[dict[str, Any], Tensor, str, Tensor]] = []  # working state to store back
        self._positions: dict[Tensor, int] = {}  # each parameter's place, for its rounding stream
        super().__init__(normalize_params(params), defaults)

    # -- validation ---------------------------------------------------------------------
    def _validate(self, hyper: Mapping[str, Any], where: str) -> None:
        for key, check in {**self._common_checks, **self._checks}.items():
            if key in hyper:
                try:
                    check.check(key, hyper[key])
                except ValueError as e:
                    raise ValueError(f"{type(self).__name__}: {e}{where}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # groups added after construction may carry (name, param) pairs too
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        param_group = _named_group(param_group)
        self._validate(param_group, f" (in param group {len(self.param_groups)})")
        for p in param_group["params"]:
            if not isinstance(p, Tensor):
                raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(p))
            if not p.is_floating_point() and not p.is_complex():
                raise ValueError(f"{type(self).__name__} can only optimize floating-point tensors, got {p.dtype}")
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters")
        names = param_group.get("param_names") or [f"param_groups[{len(self.param_groups)}][{i}]" for i in range(len(param_group["params"]))]
        for p, name in zip(param_group["params"], names):
            _refuse_fsdp1(type(self).__name__, p, name)
        self._check_precision({**self.defaults, **param_group}, zip(param_group["params"], names))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if _precision.uses_rounding(group):
            group.setdefault("rounding_seed", _precision.new_seed())
            group.setdefault("rounding_step", 0)
            self._seeds_agreed = False
        self._positions = {}

    def _check_precision(self, group: Mapping[str, Any], named: Iterable[tuple[Tensor, str]]) -> None:
        me = type(self).__name__
        prec = group.get("state_precision", "param")
        _precision.check_state_keys(me, prec, self._element_kinds)
        for p, name in named:
            if group.get("stochastic_rounding") and p.dtype != torch.bfloat16:
                raise ValueError(f"{me}: stochastic_rounding=True is for bfloat16 parameters; parameter {name!r} is "
                                 f"{p.dtype}, whose update needs no rounding to bfloat16")

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; a subclass's own
        # attributes (Adam-mini's partition) must survive deepcopy and pickling too.
        # The hook dicts stay out, as in torch (they may hold unpicklable closures).
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    # -- state_dict ---------------------------------------------------------------------
    # state entries every stepped parameter has, and those shaped like the parameter
    _state_keys: tuple[str, ...] = ()
    # per-element state, each a first moment / momentum (MOMENT) or a second moment (SECOND)
    _element_kinds: dict[str, str] = {"exp_avg": MOMENT, "exp_avg_sq": SECOND, "momentum_buffer": MOMENT}

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, each group naming the class that saved it (so that loading
        into another class is caught); the post-hooks see it whole, and may replace it."""
        with _hooks_set_aside(self, "_optimizer_state_dict_post_hooks") as post:
            sd = super().state_dict()
        for group in sd["param_groups"]:
            group["optimizer_class"] = type(self).__name__
        return _run_hooks(self, post, sd)

    def _expected_shape(self, p: Tensor, key: str) -> tuple[int, ...] | None:
        """The shape state ``key`` of ``p`` must have (None: not checked)."""
        if key in self._element_kinds:
            return tuple(p.shape)
        return () if key == "step" else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, after checking everything first: the class that
        saved it, and every parameter's state entries and their shapes. A mismatch raises
        ``ValueError`` naming the parameter, with this optimizer unchanged. The precision
        arguments (``state_precision``, ``state_block_size``, ``state_min_size``,
        ``stochastic_rounding``) stay this optimizer's: a state saved at another precision is
        converted to it, with a one-line note. As in torch, the load pre-hooks run first (so
        the checks see the dict they return: a hook may mend an older checkpoint) and the
        post-hooks last, on the finished load."""
        with _hooks_set_aside(self, "_optimizer_load_state_dict_pre_hooks") as pre, \
                _hooks_set_aside(self, "_optimizer_load_state_dict_post_hooks") as post:
            state_dict = _run_hooks(self, pre, dict(state_dict) if isinstance(state_dict, Mapping) else state_dict)
            self._check_loadable(state_dict)
            # how this optimizer stores its state is its own (the saved state is converted to it);
            # every other hyperparameter comes from the checkpoint, as in torch
            kept = [{k: g[k] for k in _precision.precision_checks() if k in g} for g in self.param_groups]
            super().load_state_dict(state_dict)
            for group, own in zip(self.param_groups, kept):
                group.update(own)
                if _precision.uses_rounding(group):
                    group.setdefault("rounding_seed", _precision.new_seed())
                    group.setdefault("rounding_step", 0)
                    self._seeds_agreed = False
            self._restore_compact(state_dict)
        for hook in post.values():
            hook(self)

    def _check_loadable(self, state_dict: Mapping[str, Any]) -> None:
        me = type(self).__name__
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{me}.load_state_dict: not an optimizer state_dict (it needs 'state' and 'param_groups')")
        saved_groups = state_dict["param_groups"]
        for group in saved_groups:
            saved_by = group.get("optimizer_class")
            if saved_by is not None and saved_by != me:
                raise ValueError(f"{me}.load_state_dict: this state was saved by {saved_by}; build a {saved_by} to load it "
                                 f"(its state and hyperparameters mean something else to {me})")
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            return  # torch's own check says so, before changing anything
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            st = state_dict["state"].get(i)
            if not st:
                continue
            missing = [k for k in self._state_keys if k not in st]
            if missing:
                raise ValueError(f"{me}.load_state_dict: parameter {self.param_name(p)!r} has no {', '.join(missing)} in "
                                 f"this state (keys: {', '.join(map(str, st))}); was it saved by another optimizer?")
            for key, value in st.items():
                want = self._expected_shape(p, key)
                kind = self._element_kinds.get(key)
                if kind is not None and isinstance(value, Tensor) and _precision.format_of(st, key, kind, p) == "int4":
                    want = _precision.code_shape(p, "int4")
                if isinstance(value, Tensor) and want is not None and tuple(value.shape) != want:
                    raise ValueError(f"{me}.load_state_dict: state {key!r} of parameter {self.param_name(p)!r} has shape "
                                     f"{tuple(value.shape)}, expected {want}; {self._shape_hint(key)}")
        if all(g.get("optimizer_class") is None for g in saved_groups):
            # torch's optimizers load any state whose group sizes fit, so a foreign one is loaded, but said
            known = set(self.defaults) | {k for g in self.param_groups for k in g} | _GROUP_KEYS_OF_ANY_OPTIMIZER
            foreign = sorted({k for g in saved_groups for k in g} - known)
            if foreign:
                used = set(self._state_keys) | {"step"}
                unused = sorted({k for st in state_dict["state"].values() for k in st} - used, key=str)
                warnings.warn(f"{me}.load_state_dict: this state records no optimizer class and has settings {me} does not "
                              f"have ({', '.join(map(str, foreign))}): was it saved by another optimizer? It is loaded as "
                              "torch would load it: its hyperparameters (but not the state precision) and its state"
                              + (f", including entries {me} does not use ({', '.join(map(str, unused))})" if unused else ""),
                              UserWarning, stacklevel=user_stacklevel())

    def _shape_hint(self, key: str) -> str:
        return "the state was saved for other parameters"

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also the end of load_state_dict: bring older checkpoints up to date, as torch's
        # own optimizers do (Python-number steps, groups saved before a hyperparameter existed)
        super().__setstate__(state)
        for group in self.param_groups:
            for key in self._group_keys:
                group.setdefault(key, self.defaults[key])
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not isinstance(st["step"], Tensor):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

    # -- names --------------------------------------------------------------------------
    def param_names(self) -> dict[Tensor, str]:
        """Every named parameter's name (``param_groups[i]["param_names"]``, as in torch)."""
        return {p: n for g in self.param_groups for p, n in zip(g["params"], g.get("param_names", ()))}

    def param_name(self, p: Tensor) -> str:
        """The name given for ``p`` (named parameters or the model), else its position."""
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return names[pi] if names else f"param_groups[{gi}][{pi}]"
        return "<unknown parameter>"

    # -- stepping -----------------------------------------------------------------------
    def _grads(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Params of ``group`` that have a gradient and elements, and those gradients (sparse rejected).
        With ``skip_nonfinite``, a parameter whose gradient holds a NaN or an Inf is left
        out (its state untouched) and counted in ``group["nonfinite_skips"]``."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:  # no elements: nothing to step, and no block or scale to form
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter {self.param_name(p)!r}); use a dense embedding (sparse=False)"
                )
            params.append(p)
            grads.append(p.grad)
        if group.get("skip_nonfinite") and params:
            finite = all_finite(grads)
            skipped = [p for p, ok in zip(params, finite) if not ok]
            if skipped:
                group["nonfinite_skips"] = group.get("nonfinite_skips", 0) + len(skipped)
                self.last_nonfinite.extend(self.param_name(p) for p in skipped)
                params = [p for p, ok in zip(params, finite) if ok]
                grads = [g for g, ok in zip(grads, finite) if ok]
        return params, grads

    @property
    def nonfinite_skips(self) -> int:
        """How many times ``skip_nonfinite`` skipped a parameter's step (saved in the
        ``state_dict``, per param group as ``"nonfinite_skips"``); the names skipped in
        the latest step are in ``last_nonfinite``."""
        return sum(g.get("nonfinite_skips", 0) for g in self.param_groups)

    # Not traced by torch.compile: the step's fast path is already one fused kernel per
    # pass (C or inductor), and tracing its per-tensor Python (step counters read as numbers,
    # ctypes calls) would only break graphs. A compiled training step breaks its graph here
    # once, as torch's own zero_grad does, and never recompiles for it.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss;
                it is called exactly once, with gradients enabled, before the update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_nonfinite, self.last_backends = [], {}
        if not getattr(self, "_seeds_agreed", True):
            self._agree_on_rounding_seeds()
        with batched_reductions():  # sums of sharded tensors that can wait cross the ranks once
            self._update()
        self._store_state()
        for group in self.param_groups:
            if _precision.uses_rounding(group):  # the next step draws other bits
                group["rounding_step"] = group.get("rounding_step", 0) + 1
        return loss

    def _agree_on_rounding_seeds(self) -> None:
        # Replicated parameters (DDP) must draw the same rounding bits on every rank, or the
        # replicas drift apart; each rank's seed came from its own torch.initial_seed(), which
        # users often offset by the rank. Rank 0's seeds win, once (at the first step after
        # the groups or their seeds changed, a point every rank of a training loop reaches).
        groups = [g for g in self.param_groups if "rounding_seed" in g]
        for group, seed in zip(groups, rank_zero_ints([g["rounding_seed"] for g in groups])):
            group["rounding_seed"] = seed
        self._seeds_agreed = True

    def _update(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _route(self, backends: Backends, group: dict[str, Any], *columns: list[Any], **options: Any) -> None:
        """One group's step through the family's ``backends``, each tensor on the backend
        ``group["fused"]`` chooses (:mod:`leanopt._backend`); counted in ``last_backends``.
        Then the group's compact state is stored back, and with ``stochastic_rounding`` the
        parameters, stepped as float32 copies, are rounded back to bfloat16.

        Compact state (:meth:`_element_state`'s :class:`_Deferred` entries) is decoded a slice
        of tensors at a time (about :data:`SLICE_ELEMENTS` elements), stepped and encoded
        again before the next slice, so that the float working copies of a step never
        exceed one slice's: the step's peak memory stays near the compact state's."""
        if not any(isinstance(x, _Deferred) for column in columns[2:] for x in column):
            self._route_slice(backends, group, columns, options)
            return
        columns = self._route_compact(backends, group, columns, options)
        # sharded tensors in one slice: their statistics cross the ranks once per step (and
        # each rank's working copies are those of its shards only)
        limit = math.inf if any(is_dtensor(p) for p in columns[0]) else SLICE_ELEMENTS
        start, size = 0, 0
        for i, p in enumerate(columns[0]):
            size += p.numel()
            if size >= limit or i == len(columns[0]) - 1:
                part = [[self._working(x) for x in column[start:i + 1]] for column in columns]
                self._route_slice(backends, group, part, options)
                start, size = i + 1, 0

    def _route_compact(self, backends: Backends, group: dict[str, Any], columns: tuple[list[Any], ...],
                       options: dict[str, Any]) -> list[list[Any]]:
        """Step the float32 tensors whose compact state a one-pass kernel takes as it is
        stored: the family's C kernel (``backends.compact``, for the rows
        ``backends.compact_takes`` accepts; CPU), else its compiled kernels where the family's
        take compact state (``backends.compiled_compact``; CUDA, and the CPU under
        ``fused=True`` where the C kernels are not built). Returns the columns of the others
        (stepped from decoded copies)."""
        fused = group["fused"]
        if fused is False:
            return list(columns)
        built = _native.library() is not None
        native = backends.compact is not None and built
        takes = backends.compact_takes or (lambda row, o: backends.elementwise is not None and backends.elementwise(o))
        picked: dict[str, tuple[list[int], list[list[Any]]]] = {COMPACT: ([], []), COMPILED_COMPACT: ([], [])}
        for i, (p, g) in enumerate(zip(columns[0], columns[1])):
            if p.dtype != torch.float32 or g.dtype != p.dtype or is_dtensor(p) or not (p.is_contiguous() and g.is_contiguous()):
                continue
            states = [column[i] for column in columns[2:backends.streams]]
            candidates = []
            if native and _native.supports(p, g) and takes([column[i] for column in columns], options):
                candidates.append((COMPACT, [self._compact_view(x, backends.compact_formats, p, True) for x in states]))
            if backends.compiled_compact and (p.device.type == "cuda" or (fused and not built)):
                candidates.append((COMPILED_COMPACT, [self._compact_view(x, _precision.PACKED_FORMATS, p, False)
                                                      for x in states]))
            for path, row in candidates:
                if _NO not in row and any(isinstance(v, _native.CompactState) for v in row):
                    picked[path][0].append(i)
                    picked[path][1].append(row)
                    break
        taken: set[int] = set()
        for path, (idx, views) in picked.items():
            if not idx:
                continue
            cols = [[column[i] for i in idx] for column in columns]
            cols[2:backends.streams] = [list(states) for states in zip(*views)]
            (backends.compact if path == COMPACT else backends.compiled)(*cols, **options)
            self.last_backends[path] = self.last_backends.get(path, 0) + len(idx)
            taken.update(idx)
        if not taken:
            return list(columns)
        keep = [i for i in range(len(columns[0])) if i not in taken]
        return [[column[i] for i in keep] for column in columns]

    def _compact_view(self, x: Any, formats: tuple[str, ...], p: Tensor, native: bool) -> Any:
        """A state entry of ``p`` as a one-pass compact kernel takes it: int8/int4 codes or
        bf16 state already in the group's format, of one of ``formats`` (a
        :class:`leanopt._native.CompactState`; ``native``: the C kernel's, whose blocks have
        a largest size), a float32 tensor as it is; ``_NO`` for anything else (a format to
        convert, a missing buffer)."""
        if isinstance(x, _Deferred):
            state, kind = self.state[x.p], self._element_kinds[x.key]
            have = _precision.format_of(state, x.key, kind, x.p)
            if have != _precision.stored_format(x.group, x.key, kind, x.p) or have not in formats:
                return _NO
            if have == "bf16":  # written back with this step's rounding bits, as _store_state would
                if not state[x.key].is_contiguous():
                    return _NO
                key = self._rounding_key(x.group, x.p, 1 + list(self._element_kinds).index(x.key))
                return _native.CompactState(state[x.key], None, have, 0, key)
            block = _precision.block_of(state, x.key, x.p)
            if native and not 0 < block <= _native.COMPACT_MAX_BLOCK:
                return _NO
            return _native.CompactState(state[x.key], state[x.key + _precision.SCALE_SUFFIX], have, block)
        if isinstance(x, Tensor) and x.dtype == torch.float32 and x.device == p.device and x.is_contiguous():
            return x
        return _NO

    def _working(self, x: Any) -> Any:
        """A deferred compact state decoded into its float working tensor (stored back by
        :meth:`_store_state`); anything else as it is."""
        if not isinstance(x, _Deferred):
            return x
        state, kind = self.state[x.p], self._element_kinds[x.key]
        work = _precision.decode(state, x.key, kind, x.p)
        self._stores.append((x.group, x.p, x.key, work))
        return work

    def _route_slice(self, backends: Backends, group: dict[str, Any], columns: list[list[Any]] | tuple,
                     options: dict[str, Any]) -> None:
        params = columns[0]
        # a 16-bit parameter whose state is stepped as float32 working copies (or whose update
        # is rounded stochastically) is stepped in float32 too, with its gradient
        upcast = [p.dtype in (torch.bfloat16, torch.float16) and (group.get("stochastic_rounding") or
                                                                  group.get("state_precision", "param") != "param")
                  for p in params]
        if any(upcast):
            columns = ([p.float() if up else p for p, up in zip(params, upcast)],
                       [g.float() if up else g for g, up in zip(columns[1], upcast)], *columns[2:])
        used = route(backends, group["fused"], columns, options, name_of=lambda i: self.param_name(params[i]))
        for backend, n in used.items():
            self.last_backends[backend] = self.last_backends.get(backend, 0) + n
        for p, work, up in zip(params, columns[0], upcast):
            if up and group.get("stochastic_rounding"):
                _precision.stochastic_round_(p, work, self._rounding_key(group, p, 0))
            elif up:
                p.copy_(work)
        self._store_state()

    # -- state precision (leanopt.precision) ----------------------------------------------
    def _element_state(self, group: dict[str, Any], p: Tensor, key: str,
                       memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
        """Per-element state ``key`` of ``p``, created as zeros where missing, for the step
        to update in place: the stored tensor itself at the parameter's precision; else a
        :class:`_Deferred` handle that :meth:`_route` decodes into a float working copy when
        it steps ``p``, and stores back right after."""
        state, kind = self.state[p], self._element_kinds[key]
        fmt = _precision.stored_format(group, key, kind, p)
        if fmt == "param" and (key not in state or _precision.format_of(state, key, kind, p) == "param"):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=memory_format)
            return state[key]
        if key not in state:
            self._set_element_state(group, p, key, torch.zeros_like(p, dtype=_precision.working_dtype(p)))
        return _Deferred(group, p, key)

    def _set_element_state(self, group: dict[str, Any], p: Tensor, key: str, value: Tensor) -> None:
        """``state[key] ← value`` in the group's format (a copy: ``value`` is not kept)."""
        self._stores.append((group, p, key, value.detach().to(_precision.working_dtype(p), copy=True,
                                                                memory_format=torch.contiguous_format)))
        self._store_state()

    def _store_state(self) -> None:
        for group, p, key, work in self._stores:
            kind, state = self._element_kinds[key], self.state[p]
            fmt = _precision.stored_format(group, key, kind, p)
            rounding = self._rounding_key(group, p, 1 + list(self._element_kinds).index(key)) if fmt == "bf16" else None
            entries = _precision.encode(work, fmt, kind, p, group.get("state_block_size", 256), rounding)
            for stale in _precision.stored_keys(key, "int8"):
                state.pop(stale, None)
            for suffix, value in entries.items():
                state[key + suffix] = value
        self._stores = []

    def _rounding_key(self, group: dict[str, Any], p: Tensor, stream: int) -> int | None:
        """The key of ``p``'s rounding bits in this step (``stream``: 0 the parameter, 1 + i
        its i-th state); None where the group rounds nothing stochastically."""
        if not _precision.uses_rounding(group):
            return None
        if not self._positions:
            self._positions = {q: i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return _precision.rounding_key(group.get("rounding_seed", 0), group.get("rounding_step", 0),
                                       self._positions[p] * 8 + stream)

    def _restore_compact(self, state_dict: Mapping[str, Any]) -> None:
        """After torch's ``load_state_dict``, which casts every state tensor to a floating-point
        parameter's dtype: codes, block scales and bf16 state as they were saved; then any
        state saved in another format than the group's converted, with a one-line note."""
        converted: dict[tuple[str, str], int] = {}
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for i, p in zip(saved_group["params"], group["params"]):
                saved, state = state_dict["state"].get(i), self.state.get(p)
                if not saved or state is None:
                    continue
                for key, value in saved.items():
                    if isinstance(key, str) and isinstance(value, Tensor) and (
                            key.endswith(_precision.SCALE_SUFFIX) or value.dtype in _precision.COMPACT_DTYPES):
                        state[key] = value.to(device=p.device, copy=True)
                for key, kind in self._element_kinds.items():
                    if key not in state:
                        continue
                    have, want = _precision.format_of(state, key, kind, p), _precision.stored_format(group, key, kind, p)
                    # another block size counts as another format (its scales have another shape)
                    reblock = have in ("int8", "int4") and have == want and tuple(
                        state[key + _precision.SCALE_SUFFIX].shape) != _precision.scale_shape(p, group["state_block_size"])
                    if reblock or not _precision.same_storage(have, want, p):
                        self._stores.append((group, p, key, _precision.decode(state, key, kind, p, have)))
                        label = (f"{have} in blocks of {_precision.block_of(state, key, p)}",
                                 f"{want} in blocks of {group['state_block_size']}") if reblock else (have, want)
                        converted[label] = converted.get(label, 0) + 1
        self._store_state()
        if converted:
            what = ", ".join(f"{n} from {a} to {b}" for (a, b), n in converted.items())
            warnings.warn(f"leanopt: {type(self).__name__}.load_state_dict converted state tensors saved at another "
                          f"state_precision ({what})", UserWarning, stacklevel=user_stacklevel())


SLICE_ELEMENTS = 1 << 23  # parameters' elements whose compact state is decoded at once (32 MiB a float32 state)


_NO = object()  # a state entry the one-pass compact kernel cannot take


class _Deferred(NamedTuple):
    """A compact per-element state, decoded when its tensor is stepped (:meth:`LeanOptimizer._route`)."""

    group: dict[str, Any]
    p: Tensor
    key: str


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _refuse_fsdp1(optimizer: str, p: Tensor, name: str) -> None:
    """FSDP1 (``FullyShardedDataParallel``) hides each tensor's shape: a flat parameter
    concatenates many tensors (``use_orig_params=False``), and with ``use_orig_params=True``
    each rank's tensors are flat slices of it. Per-tensor and per-block statistics (Adam-mini's
    blocks, SGD-SaI's g-SNR, the mask's sums) would be computed over the wrong elements and
    train silently wrong, so such parameters are refused. FSDP2 keeps the shapes (DTensors)."""
    if type(p).__name__ == "FlatParameter" or "_flat_param" in name:
        raise ValueError(f"{optimizer}: parameter {name!r} is an FSDP1 flat parameter (FullyShardedDataParallel with "
                         "use_orig_params=False): it concatenates many tensors, so no per-tensor or per-block statistic "
                         "can be right. Shard with FSDP2 (torch.distributed.fsdp.fully_shard), whose parameters keep their "
                         "shapes; use_orig_params=True does not help either (each rank holds flat slices)")
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(f"{optimizer}: parameter {name!r} belongs to an FSDP1 module (FullyShardedDataParallel, "
                         "use_orig_params=True): each rank holds a flat slice of it, so its per-tensor and per-block "
                         "statistics cannot be computed. Shard with FSDP2 (torch.distributed.fsdp.fully_shard) instead")


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` that points at the first caller outside
    leanopt and torch (the user's line), however deep the warning is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def scalar(x: float | Tensor) -> float:
    """A hyperparameter that may be a one-element tensor (a tensor ``lr``), as a number."""
    return x.item() if isinstance(x, Tensor) else x


def step_tensor() -> Tensor:
    """A fresh per-parameter step counter, kept on the CPU in float32 like ``torch.optim``."""
    return torch.zeros((), dtype=torch.float32)


def acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype reductions are computed in: at least float32, float64 for float64 tensors."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bias_corrections(beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """Adam's bias corrections at ``step``: ``1 − β1^t`` and ``sqrt(1 − β2^t)``."""
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


def finite_terms(x: Tensor) -> Tensor:
    """``x`` with its NaN and ±Inf entries replaced by 0: the terms of a statistic shared
    across elements (a block mean of g², the mask's sums, a g-SNR), so that one
    non-finite gradient element reaches its own parameter and state and nothing else
    (the rule of every path: ``docs/algorithms.md`` §0)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def direction(maximize: bool) -> float:
    """The sign every step gives its gradient: ``-1.0`` to maximize the objective."""
    return -1.0 if maximize else 1.0


def decay_factor(lr: float, weight_decay: float) -> float:
    """Decoupled weight decay (Loshchilov & Hutter) as the factor ``1 − lr·wd`` the
    parameter is multiplied by before the update (the ``decay`` of every step record)."""
    return 1 - lr * weight_decay


def decay_(p: Tensor, decay: float) -> None:
    """``p ← decay·p``; nothing at all when ``decay`` is 1 (no weight decay)."""
    if decay != 1:
        p.mul_(decay)


def decoupled_decay_(p: Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay ``p ← p·(1 − lr·wd)``, before the update."""
    decay_(p, decay_factor(lr, weight_decay))
