"""One registry for every optimizer: ``create_optimizer(name, model_or_params, **kwargs)``.

Entries are leanopt's own optimizers and the ``torch.optim`` baselines they are measured
against. For the baselines the registry picks the implementation explicitly
(``fused``/``foreach``): on the CPU torch's default is its slow per-tensor loop, which
would make every comparison flatter than it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._distributed import is_dtensor
from ._optimizer import trainable_named_parameters, unwrap_model
from .adam_mini import AdamMini
from .alpha_adam import AdamW, AlphaAdam, CAdamW
from .lion import Lion
from .precision import precision_checks
from .pma import AdamWPMA, LionPMA
from .sgd_sai import SGDSaI

__all__ = ["OptimizerInfo", "create_optimizer", "list_optimizers", "optimizer_info", "register", "state_bytes"]


@dataclass(frozen=True)
class OptimizerInfo:
    """What the registry knows of one optimizer."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    paper: str
    state: str  # optimizer state per parameter, in words
    structure_aware: bool = False  # takes model= to read the model's structure
    named: bool = False  # accepts (name, param) pairs
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, OptimizerInfo] = {}


def register(info: OptimizerInfo) -> OptimizerInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"optimizer {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_optimizers() -> list[str]:
    """Names accepted by :func:`create_optimizer`, in registration order."""
    return list(_REGISTRY)


def optimizer_info(name: str) -> OptimizerInfo:
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def create_optimizer(name: str, model_or_params: nn.Module | Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for a model or for parameters.

    Given an ``nn.Module`` (or a ``DistributedDataParallel``/``DataParallel`` wrapper of
    one), its trainable parameters (``requires_grad``) are optimized and structure-aware
    optimizers (Adam-mini) also read its modules and config. Given
    parameters (tensors, ``(name, param)`` pairs or param-group dicts), they are passed on.
    ``kwargs`` go to the optimizer and override the registry's defaults.
    """
    info = optimizer_info(name)
    args = {**info.defaults, **kwargs}
    if isinstance(model_or_params, nn.Module):
        model = unwrap_model(model_or_params)
        named = trainable_named_parameters(model)
        if info.structure_aware:
            given = args.pop("model", model)
            if unwrap_model(given) is not model:
                raise ValueError(f"create_optimizer({info.name!r}, ...): model={type(given).__name__} is not the module "
                                 "given as model_or_params; pass the model once")
            return info.factory(named, model=model, **args)
        return info.factory(named if info.named else [p for _, p in named], **args)
    return info.factory(model_or_params, **args)


def state_bytes(opt: torch.optim.Optimizer, whole: bool = False) -> int:
    """Bytes of an optimizer's state tensors (the step counters left out): held by this
    process (under FSDP2 or TP, this rank's shards), or with ``whole`` those of the whole
    state once (a sharded tensor at its full size, a replicated one once)."""
    return sum(
        _tensor_bytes(v.to_local() if is_dtensor(v) and not whole else v)
        for st in opt.state.values()
        for k, v in st.items()
        if isinstance(v, torch.Tensor) and k != "step"
    )


def _tensor_bytes(t: torch.Tensor) -> int:
    # a wrapper subclass that stores other tensors (torchao's quantized optimizer state)
    # reports its logical dtype; its bytes are those of the tensors inside
    if type(t) is not torch.Tensor and not is_dtensor(t) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _adafactor(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
    if not hasattr(torch.optim, "Adafactor"):
        raise RuntimeError(f"adafactor needs torch >= 2.5 (this is torch {torch.__version__})")
    return torch.optim.Adafactor(*args, **kwargs)


def _adamw(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (fused), or leanopt's :class:`AdamW` -- the same update -- when a
    precision argument (``state_precision``, ``stochastic_rounding``, …) asks for what
    torch's lacks; ``fused`` then keeps leanopt's meaning (True: its C kernels)."""
    if set(kwargs) & set(precision_checks()):
        return AdamW(params, **kwargs)
    return torch.optim.AdamW(params, **{"fused": True, **kwargs})


_adamw.__signature__ = inspect.signature(AdamW)  # what it takes, for callers that ask (the Trainer helper)


register(OptimizerInfo(
    "adamw", _adamw, "Loshchilov & Hutter 2019, arXiv:1711.05101 (torch.optim; leanopt.AdamW for compact state)",
    "2 (m, v)",
))
register(OptimizerInfo(
    "adam-mini", AdamMini, "Zhang et al. 2024, arXiv:2406.16793",
    "~1 (m, one v per block)", structure_aware=True, named=True,
))
register(OptimizerInfo(
    "sgd-sai", SGDSaI, "Xu et al. 2024, arXiv:2412.11768",
    "1 (m, one scale per tensor)", named=True,
))
register(OptimizerInfo(
    "alpha-adam", AlphaAdam, "Chang et al. 2025, arXiv:2501.18094",
    "2 (m, v)", named=True,
))
register(OptimizerInfo(
    "cadamw", CAdamW, "Liang et al. 2024, arXiv:2411.16085 (cautious AdamW)",
    "2 (m, v)", named=True,
))
register(OptimizerInfo(
    "lion", Lion, "Chen et al. 2023, arXiv:2302.06675",
    "1 (m)", named=True,
))
register(OptimizerInfo(
    "adamw-pma", AdamWPMA, "PMA paper, Algorithm 1 (AdamW with periodic moving average)",
    "2 (m, v)", named=True,
))
register(OptimizerInfo(
    "lion-pma", LionPMA, "PMA paper, Algorithm 2 (Lion with periodic moving average)",
    "1 (m)", named=True,
))
register(OptimizerInfo(
    "sgd", torch.optim.SGD, "SGD with momentum 0.9 (torch.optim)",
    "1 (momentum)", defaults={"lr": 1e-2, "momentum": 0.9, "foreach": True},
))
register(OptimizerInfo(
    "adafactor", _adafactor, "Shazeer & Stern 2018, arXiv:1804.04235 (torch.optim)",
    "~0 (factored row/column v)", defaults={"foreach": True},
))
