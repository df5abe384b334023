"""Small shared pieces of the test suite: a toy language-model problem and comparisons."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from leanopt.models import build_model

VOCAB = 64  # the "tiny" preset


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny", **overrides).to(dtype)


def batch(step: int, size: int = 8, seq: int = 16) -> tuple[Tensor, Tensor]:
    """A fixed, step-dependent batch of random tokens (inputs, targets)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (size, seq + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def loss_of(model: nn.Module, step: int, sign: float = 1.0) -> Tensor:
    return sign * model(*batch(step))[1]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range | int, fixed_batch: bool = False) -> list[float]:
    losses = []
    for s in range(steps) if isinstance(steps, int) else steps:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, 0 if fixed_batch else s)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def fixed_gradient_steps(params: list[Tensor], opt: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` steps of ``opt`` on a fixed stream of random gradients (seed 1, each in its
    parameter's dtype): rounding cannot feed back through a loss."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def max_rel_diff(a: nn.Module | Iterable[Tensor], b: nn.Module | Iterable[Tensor]) -> float:
    """Largest per-tensor relative difference ||a-b|| / ||b||, over two models' parameters
    or two lists of tensors."""
    worst = 0.0
    tensors = (lambda x: x.parameters() if isinstance(x, nn.Module) else x)
    for x, y in zip(tensors(a), tensors(b), strict=True):
        d = (x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)
        worst = max(worst, d.item())
    return worst


def state_equal(s1: dict, s2: dict) -> bool:
    if s1.keys() != s2.keys():
        return False
    for k in s1:
        a, b = s1[k], s2[k]
        if isinstance(a, Tensor):
            if not isinstance(b, Tensor) or a.dtype != b.dtype or not torch.equal(a, b):
                return False
        elif a != b:
            return False
    return True


def strip_timing(rows: list[dict]) -> list[dict]:
    """Benchmark metrics without the clock readings (which differ between two runs)."""
    return [{k: v for k, v in r.items() if k not in ("opt_ms", "step_ms", "wall_s")} for r in rows]
