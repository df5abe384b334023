"""The name rules of the released ``adam-mini`` 1.1.1 (``AdamMini(..., partition="names")``,
or ``dim=``/``n_heads=`` without a model), reproduced exactly for drop-in parity."""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout
from .rules import BlockRule

__all__ = ["name_rule", "EMBD_NAMES", "OUTPUT_NAMES", "WQK_NAMES", "WV_NAMES", "ATTN_PROJ_NAMES", "MLP_NAMES"]


# The substring sets of the released adam-mini 1.1.1, kept verbatim for drop-in parity.
EMBD_NAMES = ("embed", "embd", "wte")
OUTPUT_NAMES = ("lm_head", "output", "final_layer")
WQK_NAMES = ("k_proj", "q_proj", "wq", "wk", "query", "key")
WV_NAMES = ("v_proj", "wv", "value")
ATTN_PROJ_NAMES = ("o_proj", "wo", "attn.proj")
MLP_NAMES = ("feed_forward", "linear", "mlp")


def name_rule(name: str, shape: torch.Size | tuple[int, ...], dim: int | None, n_heads: int | None) -> BlockRule:
    """The block rule adam-mini 1.1.1 applies to the parameter called ``name``."""
    low = name.lower()
    numel = math.prod(shape)
    decay = not ("norm" in low or "ln" in low or "bias" in low)
    if "bias" in low:
        return BlockRule("bias", BlockLayout.element(numel), decay)
    if any(k in low for k in WQK_NAMES):
        if dim is None or n_heads is None:
            raise ValueError(
                f"AdamMini: parameter {name!r} is a query/key projection by name, so the name-based "
                "partition needs dim= and n_heads= (or pass model= for the structure-aware partition)"
            )
        if (dim * dim) % n_heads:
            raise ValueError(f"AdamMini: dim*dim={dim * dim} is not divisible by n_heads={n_heads}")
        head_numel = dim * dim // n_heads
        if numel % head_numel:
            raise ValueError(
                f"AdamMini: {name!r} has {numel} elements, not a multiple of dim*dim/n_heads={head_numel}; "
                "check dim= and n_heads="
            )
        chunks = numel // head_numel
        label = "query" if any(k in low for k in ("q_proj", "wq", "query")) else "key"
        return BlockRule(f"{label} ({chunks} heads)", BlockLayout((chunks, head_numel), 0, ((chunks, 1),)), decay)
    for label, keys in (("embedding", EMBD_NAMES), ("output", OUTPUT_NAMES), ("value", WV_NAMES), ("attn-proj", ATTN_PROJ_NAMES), ("mlp", MLP_NAMES)):
        if any(k in low for k in keys):
            return BlockRule(label, BlockLayout.per_lane(tuple(shape)) if len(shape) else BlockLayout.whole(1), decay)
    return BlockRule("whole", BlockLayout.whole(numel), decay)
