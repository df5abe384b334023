"""Benchmark configuration: what model, what data, how long, which optimizer runs.

Everything is counted in *micro-batches* so that an optimizer that steps once per K
micro-batches (gradient accumulation) and one that steps after every micro-batch (PMA)
see exactly the same samples in the same order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..models import PRESETS
from ..registry import list_optimizers

PEER_PREFIX = "torchao:"  # a run's optimizer "torchao:CLASS": torchao.optim's CLASS, a peer to compare with

__all__ = ["ConfigError", "ModelSpec", "TrainConfig", "RunSpec"]


class ConfigError(ValueError):
    """An invalid benchmark configuration, reported before any training starts."""


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """A GPT preset with overrides, or a transformers config JSON (``hf_config``)."""

    preset: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)
    hf_config: str | None = None

    def validate(self) -> None:
        if self.hf_config is None and self.preset not in PRESETS:
            raise ConfigError(f"unknown model preset {self.preset!r}; choose one of {', '.join(PRESETS)}")


@dataclass(frozen=True)
class TrainConfig:
    corpus: str
    model: ModelSpec = ModelSpec()
    seq_len: int = 128
    micro_batch: int = 16
    micro_steps: int = 200  # micro-batches in the whole run
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1  # the cosine ends at min_lr_frac · lr
    eval_every: int = 20  # micro-batches between validations (a multiple of every run's accum)
    eval_batches: int = 8
    bf16: bool = False
    device: str = "cpu"
    init_from: str | None = None  # a cached base model (finetuning): see tasks.base_model
    checkpoint_every: int = 0  # micro-batches between checkpoints; 0: at every validation

    def validate(self) -> None:
        self.model.validate()
        for name in ("seq_len", "micro_batch", "micro_steps", "eval_every", "eval_batches"):
            _positive(name, getattr(self, name))
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0 <= self.min_lr_frac <= 1:
            raise ConfigError(f"min_lr_frac must be in [0, 1], got {self.min_lr_frac}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.model.hf_config is None:
            max_len = PRESETS[self.model.preset].max_seq_len if "max_seq_len" not in self.model.overrides else self.model.overrides["max_seq_len"]
            if self.seq_len > max_len:
                raise ConfigError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {max_len}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def with_(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class RunSpec:
    """One training run: an optimizer, its learning rate and its accumulation."""

    label: str
    optimizer: str
    lr: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    group: str = ""  # runs that differ only by seed share a group (for mean and spread)

    @property
    def key(self) -> str:
        return f"{self.label}-s{self.seed}"

    @property
    def group_name(self) -> str:
        return self.group or self.label

    def validate(self, train: TrainConfig) -> None:
        peer = self.optimizer.startswith(PEER_PREFIX)  # a peer's optimizer, for comparison (bench.train.build_optimizer)
        if not peer and self.optimizer not in list_optimizers():
            raise ConfigError(f"run {self.label!r}: unknown optimizer {self.optimizer!r}; valid: {', '.join(list_optimizers())}, "
                              f"or {PEER_PREFIX}CLASS (torchao.optim's)")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"run {self.label!r}: lr must be > 0, got {self.lr!r}")
        _positive(f"run {self.label!r}: accum", self.accum)
        if train.micro_steps % self.accum:
            raise ConfigError(f"run {self.label!r}: micro_steps {train.micro_steps} is not a multiple of accum {self.accum}")
        if train.eval_every % self.accum:
            raise ConfigError(f"run {self.label!r}: eval_every {train.eval_every} is not a multiple of accum {self.accum}")

    def steps(self, train: TrainConfig) -> int:
        return train.micro_steps // self.accum


def fingerprint(train: TrainConfig, run: RunSpec) -> str:
    """A hash of everything that determines a run's result (a checkpoint of another
    configuration is never resumed)."""
    blob = json.dumps({"train": asdict(train), "run": asdict(run)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
