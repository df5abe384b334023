"""Parallel benchmark runs: ``torchrun --nproc_per_node=N -m leanopt bench ... --parallel MODE``.

Every rank builds the same model (same seed) and wraps it in ``DistributedDataParallel``
(``ddp``), shards it with FSDP2's ``fully_shard`` (``fsdp``), splits its attention heads and
MLP neurons over the ranks with tensor parallelism (``tp``: q/k/v and gate/up column-wise,
o and down row-wise, as Megatron and torchtitan), or both on a 2-D mesh (``fsdp+tp``: TP
over pairs of ranks, FSDP2 across the pairs). Each data-parallel rank reads only its own
slice of every micro-batch (the ranks of one TP group read the same): the global batch, the
data order and so the result are those of a single process (to rounding). Losses are averaged over the
ranks; metrics, checkpoints and reports are written by rank 0 alone. Checkpoints hold
full (unsharded) state dicts, so a run interrupted under one world size resumes under
another, or in a single process.

Launched without torchrun (no ``WORLD_SIZE`` in the environment, or 1), nothing here
creates a process group and a run is the ordinary single-process one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError

__all__ = ["MODES", "DataParallel", "init_data_parallel"]

MODES = ("ddp", "fsdp", "tp", "fsdp+tp")
TP_PAIR = 2  # the tensor-parallel degree of fsdp+tp


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run (``world == 1``: a single process)."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: str | None = None  # this rank's device (cuda:LOCAL_RANK); None: the configuration's

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def tp(self) -> int:
        """Ranks per tensor-parallel group (1: none)."""
        return {"tp": self.world, "fsdp+tp": TP_PAIR}.get(self.mode, 1) if self.active else 1

    @property
    def dp_world(self) -> int:
        return self.world // self.tp

    def check(self, micro_batch: int) -> None:
        if self.mode == "fsdp+tp" and self.world % TP_PAIR:
            raise ConfigError(f"--parallel fsdp+tp needs an even number of ranks (TP over pairs), got {self.world}")
        if micro_batch % self.dp_world:
            raise ConfigError(f"micro_batch {micro_batch} cannot be split evenly over {self.dp_world} data-parallel ranks; "
                              f"choose a world size that divides it")

    def part(self, n: int) -> slice:
        """This rank's rows of a micro-batch of ``n`` windows (equal slices, so the mean of
        the ranks' mean losses is the mean over the whole micro-batch; a TP group shares one)."""
        per, dp_rank = n // self.dp_world, self.rank // self.tp
        return slice(dp_rank * per, (dp_rank + 1) * per)

    def wrap(self, model: nn.Module, device: str) -> nn.Module:
        """The module to run forward and backward through. FSDP2 shards ``model`` in place
        (its parameters become DTensors: build the optimizer afterwards); DDP wraps it and
        keeps its parameters."""
        if not self.active:
            return model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[torch.device(device)] if device.startswith("cuda") else None)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        kind = device.split(":")[0]
        mesh = init_device_mesh(kind, (self.dp_world, self.tp), mesh_dim_names=("dp", "tp"))
        if self.tp > 1:
            tensor_parallel(model, mesh["tp"])
        if self.mode in ("fsdp", "fsdp+tp"):
            for block in _blocks(model):  # one unit per transformer block (gathered just before use), then the rest
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        return model

    def mean(self, value: float) -> float:
        """The average of ``value`` over the ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
        if self.active:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def accumulating(self, net: nn.Module, sync: bool) -> Iterator[None]:
        """Backward passes inside reduce gradients across ranks only when ``sync`` (the last
        micro-batch of an optimizer step), not after every micro-batch."""
        if not self.active or sync or self.mode == "tp":  # TP alone: no gradient to reduce across ranks
            yield
        elif self.mode == "ddp":
            with net.no_sync():
                yield
        else:
            net.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                net.set_requires_gradient_sync(True)


def tensor_parallel(model: nn.Module, mesh) -> None:
    """Megatron-style tensor parallelism of leanopt's GPT over ``mesh``: q/k/v and gate/up
    column-wise (``Shard(0)`` weights), o and down row-wise (``Shard(1)``); each rank runs
    its share of the heads. Norms and embeddings stay whole on every rank."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from ..models import GPT

    if not isinstance(model, GPT):
        raise ConfigError("--parallel tp / fsdp+tp supports leanopt's GPT models (not --hf-config models)")
    cfg, n = model.config, mesh.size()
    for what, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.resolved_kv_heads), ("mlp_hidden", cfg.resolved_mlp_hidden)):
        if value % n:
            raise ConfigError(f"tensor parallelism over {n} ranks needs {what} divisible by {n}, got {value}")
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        block.self_attn.n_heads //= n  # the attention reshapes by its local heads
        block.self_attn.n_kv_heads //= n


def _blocks(model: nn.Module) -> nn.ModuleList | list:
    """The transformer blocks: ``model.layers`` (leanopt's GPT) or, for a transformers model
    behind the benchmark's wrapper, ``model.model.model.layers``."""
    owner: object = model
    for _ in range(3):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
        owner = getattr(owner, "model", None)
    return []


def init_data_parallel(mode: str | None, device: str) -> DataParallel:
    """Join the process group that ``torchrun`` describes in the environment (``gloo`` on
    the CPU, ``nccl`` on GPUs, one GPU per local rank) and return this rank's place.
    ``mode`` None means DDP under torchrun."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DataParallel()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"local rank {local_rank} has no GPU: torch sees {torch.cuda.device_count()}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DataParallel(mode or "ddp", rank, world, device)
