"""Optimizer-state bytes at real scale, without weights.

The state's size depends on the parameters' shapes only, so each optimizer is built on
the *meta* device (tensors with a shape and no storage) for GPT-2-124M- and
Llama-2-7B-shaped models (:data:`leanopt.bench.speed.MODELS`) and takes one step; the
state tensors it allocates are then counted as on a real model. Adam-mini's partition,
SGD-SaI's per-tensor scales and every other shape rule are the shipped code's own.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..models import GPT, GPTConfig
from ..registry import create_optimizer, state_bytes
from .speed import MODELS

__all__ = ["SCALE_MODELS", "state_at_scale"]

SCALE_MODELS = ("gpt2-124m", "llama-2-7b")


def _state_bytes_on_meta(model: GPT, optimizer: str, kwargs: dict[str, Any]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Adam-mini's notes on the partition
        # the eager path: the C and compiled kernels take real tensors only
        opt = create_optimizer(optimizer, model, lr=1e-3, **{**kwargs, "fused": False})
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    n = state_bytes(opt)
    for p in model.parameters():
        p.grad = None
    return n


def state_at_scale(runs: list[tuple[str, str, dict[str, Any]]], models: tuple[str, ...] = SCALE_MODELS) -> dict[str, Any]:
    """``{model: {"n_params": …, "param_bytes": …, "state_bytes": {label: bytes}}}`` for
    ``runs`` = ``(label, optimizer name, keyword arguments)``, float32 parameters."""
    out: dict[str, Any] = {}
    for name in models:
        with torch.device("meta"):
            model = GPT(GPTConfig(**MODELS[name]))
        n = sum(p.numel() for p in model.parameters())
        sizes = {label: _state_bytes_on_meta(model, opt, kwargs) for label, opt, kwargs in runs}
        out[name] = {"n_params": n, "param_bytes": 4 * n, "state_bytes": sizes}
    return out
