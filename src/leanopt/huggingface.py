"""Hugging Face ``transformers.Trainer`` integration, without subclassing the Trainer.

::

    from transformers import Trainer, TrainingArguments
    from leanopt.huggingface import create_trainer_optimizer

    args = TrainingArguments("out", learning_rate=3e-4, weight_decay=0.1, ...)
    optimizer = create_trainer_optimizer("adam-mini", model, args)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))
    trainer.train()                      # the Trainer builds the lr scheduler from args
    trainer.train(resume_from_checkpoint=True)   # and saves/restores the optimizer state

The learning rate, ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` come from the
``TrainingArguments`` (each only where the optimizer takes it); keyword arguments
override them. Weight decay skips biases, normalization weights and other tensors of
fewer than two dimensions, as the Trainer's own optimizers do; Adam-mini applies the same
exclusions through its structure-aware partition, which it reads from the model.
This module does not import transformers: it reads the arguments by attribute.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ._optimizer import trainable_named_parameters, unwrap_model
from .partition.model import _is_norm
from .registry import create_optimizer, optimizer_info

__all__ = ["create_trainer_optimizer", "decay_parameter_names"]


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters that weight decay applies to: not biases, not
    the weights of normalization layers, and not vectors or scalars."""
    model = unwrap_model(model)
    names = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and not (pname.endswith("bias") or _is_norm(module) or p.dim() < 2):
                names.add(f"{mname}.{pname}" if mname else pname)
    return names


def _accepted(factory: Any) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()


def create_trainer_optimizer(name: str, model: nn.Module, args: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the registry optimizer ``name`` for ``model`` from ``TrainingArguments``."""
    info = optimizer_info(name)
    accepted = _accepted(info.factory)
    hyper: dict[str, Any] = {"lr": args.learning_rate}
    if "betas" in accepted or not accepted:
        hyper["betas"] = (args.adam_beta1, args.adam_beta2)
    if "eps" in accepted:
        hyper["eps"] = args.adam_epsilon
    hyper.update(kwargs)
    weight_decay = hyper.pop("weight_decay", args.weight_decay)
    model = unwrap_model(model)
    if info.structure_aware:
        return create_optimizer(name, model, weight_decay=weight_decay, **hyper)
    decay = decay_parameter_names(model)
    named = trainable_named_parameters(model)
    groups = []
    for wanted, wd in ((True, weight_decay), (False, 0.0)):
        params = [(n, p) if info.named else p for n, p in named if (n in decay) == wanted]
        if params:
            groups.append({"params": params, "weight_decay": wd})
    return create_optimizer(name, groups, **hyper)
