"""What a partition says about each parameter (:class:`BlockRule`), the rules every
partition shares (one block per tensor, per-name overrides) and how a partition is reported
(tables, warnings)."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from .._optimizer import user_stacklevel
from .layout import BlockLayout

__all__ = ["BlockRule", "PartitionRow", "PartitionWarning", "UNRECOGNIZED", "partition_plain", "override_rule",
           "apply_overrides", "format_partition", "warn_fallbacks", "warn_unrecognized"]


class PartitionWarning(UserWarning):
    """Adam-mini could not read a transformer structure and fell back to coarser blocks."""


@dataclass(frozen=True)
class BlockRule:
    """The partition of one parameter: a human-readable rule name, its layout, and
    whether the group's weight decay applies to it."""

    rule: str
    layout: BlockLayout
    decay: bool = True


@dataclass(frozen=True)
class PartitionRow:
    """One line of :meth:`AdamMini.describe_partition`."""

    name: str
    shape: tuple[int, ...]
    rule: str
    blocks: int
    state_elements: int  # m (one per element) + v (one per block)
    weight_decay: bool


UNRECOGNIZED = "whole (no rule)"


def partition_plain(params: Iterable[Tensor]) -> dict[Tensor, BlockRule]:
    """One block per tensor; vectors and scalars are excluded from weight decay."""
    return {p: BlockRule("whole", BlockLayout.whole(p.numel()), decay=p.dim() >= 2) for p in params}


# -- overrides --------------------------------------------------------------------------


def override_rule(spec: str, p: Tensor, current: BlockRule) -> BlockRule:
    """Rule for ``spec`` ("element", "neuron", "whole", "head:N") on ``p``, keeping the
    output axis the structure-aware partition found (columns for ``Conv1D``)."""
    numel = p.numel()
    axis = current.layout.axis if p.dim() == 2 else 0
    if spec == "element":
        return BlockRule("element (override)", BlockLayout.element(numel), current.decay)
    if spec == "whole":
        return BlockRule("whole (override)", BlockLayout.whole(numel), current.decay)
    if p.dim() == 0:
        raise ValueError(f"override {spec!r} needs a parameter with an output dimension")
    n_out = p.shape[axis] if p.dim() == 2 else p.shape[0]
    if spec == "neuron":
        return BlockRule("neuron (override)", BlockLayout.per_lane(p.shape, axis), current.decay)
    if spec.startswith("head:"):
        try:
            k = int(spec[5:])
        except ValueError:
            raise ValueError(f"override {spec!r}: expected head:<outputs per head>") from None
        if k <= 0 or n_out % k:
            raise ValueError(f"override {spec!r}: {n_out} outputs are not a multiple of {k}")
        return BlockRule(f"head (override, {n_out // k} heads)", BlockLayout.lanes_of(p.shape, axis, ((n_out, k),)), current.decay)
    raise ValueError(f"unknown partition override {spec!r}; use 'element', 'neuron', 'whole' or 'head:N'")


def apply_overrides(rules: dict[Tensor, BlockRule], names: Mapping[Tensor, str], overrides: Mapping[str, str]) -> set[Tensor]:
    """Replace the rule of every parameter whose name matches an ``overrides`` pattern;
    returns those parameters."""
    used, overridden = set(), set()
    for p, rule in list(rules.items()):
        name = names.get(p)
        if name is None:
            continue
        for pattern, spec in overrides.items():
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                rules[p] = override_rule(spec, p, rule)
                used.add(pattern)
                overridden.add(p)
                break
    unused = [k for k in overrides if k not in used]
    if unused:
        raise ValueError(f"AdamMini: partition overrides matched no parameter: {unused}")
    return overridden


# -- reporting --------------------------------------------------------------------------


def format_partition(rows: list[PartitionRow], *, bytes_per_element: int = 4, detail: bool = True) -> str:
    """A text table of a partition and the state memory of Adam-mini against AdamW."""
    lines = []
    if detail:
        w = max([len(r.name) for r in rows] + [9])
        rw = max([len(r.rule) for r in rows] + [4])
        lines.append(f"{'parameter':<{w}}  {'shape':<14} {'rule':<{rw}}  {'blocks':>8}  {'state elems':>12}  wd")
        for r in rows:
            shape = "x".join(map(str, r.shape)) or "scalar"
            lines.append(f"{r.name:<{w}}  {shape:<14} {r.rule:<{rw}}  {r.blocks:>8}  {r.state_elements:>12}  {'yes' if r.weight_decay else 'no'}")
        lines.append("")
    by_rule: dict[str, list[int]] = {}
    for r in rows:
        key = r.rule.split(" (")[0]
        agg = by_rule.setdefault(key, [0, 0, 0])
        agg[0] += 1
        agg[1] += math.prod(r.shape)
        agg[2] += r.blocks
    lines.append(f"{'rule':<20} {'tensors':>8} {'elements':>14} {'blocks':>12}")
    for k, (n, el, bl) in sorted(by_rule.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{k:<20} {n:>8} {el:>14,} {bl:>12,}")
    n_params = sum(math.prod(r.shape) for r in rows)
    mini = sum(r.state_elements for r in rows)
    adamw = 2 * n_params
    mb = 1024 * 1024
    lines.append("")
    lines.append(f"parameters:                {n_params:>14,} elements")
    lines.append(
        f"Adam-mini state (m + v):   {mini:>14,} elements = {mini / n_params:.4f} x params"
        f"  ({mini * bytes_per_element / mb:,.2f} MiB at {bytes_per_element} B/element)"
    )
    lines.append(
        f"AdamW state (m + v):       {adamw:>14,} elements = 2.0000 x params"
        f"  ({adamw * bytes_per_element / mb:,.2f} MiB at {bytes_per_element} B/element)"
    )
    lines.append(f"saving against AdamW:      {1 - mini / adamw:.1%} of optimizer-state memory")
    return "\n".join(lines)


def warn_fallbacks(fallbacks: list[str]) -> None:
    if fallbacks:
        warnings.warn(
            f"AdamMini used coarser blocks than its rule for {len(fallbacks)} parameter(s): "
            + "; ".join(fallbacks[:3])
            + ("; ..." if len(fallbacks) > 3 else "")
            + ". Pass n_heads=, n_kv_heads= and/or head_dim= for attention projections, overrides= for the rest.",
            PartitionWarning,
            stacklevel=user_stacklevel(),
        )


def warn_unrecognized(names: list[str]) -> None:
    if names:
        warnings.warn(
            f"AdamMini has no partition rule for {len(names)} parameter(s) and gives each one block: "
            + ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            + " (set a rule with overrides= to silence this)",
            PartitionWarning,
            stacklevel=user_stacklevel(),
        )
