"""Optimizer-step time on FSDP2 shards against the same optimizer unsharded, per element.

    torchrun --nproc_per_node=2 scripts/sharded_speed.py [--model gpt2-124m] [--repeats 5]

Every rank steps its shard of a model of :data:`leanopt.bench.speed.MODELS` (one thread per
rank, random gradients); then rank 0 alone steps the whole model, with one thread and with
as many threads as there are ranks. "per element": the sharded step's time over the
one-thread step's share of it (its time divided by the world size); "same cores": over the
unsharded step on the same number of cores (the ranks share the memory bandwidth as the
threads do). 1.0 means sharding costs nothing. "cpu": the same per-element ratio in CPU time
(``time.process_time``) instead of wall time: on a machine with other load, a rank waiting
for a core does not count, so it shows the cost of the sharded step's own work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist

import leanopt
from leanopt.bench.speed import MODELS
from leanopt.models import GPT, GPTConfig

OPTIMIZERS = ["lion", "sgd-sai", "adamw-pma", "alpha-adam", "cadamw", "adam-mini", "adam-mini+mask"]


def step_ms(model, name: str, repeats: int, sharded: bool) -> tuple[float, float, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _, variant = name.partition("+")
        opt = leanopt.create_optimizer(base, model, lr=1e-4, **({"mask": "async"} if variant == "mask" else {}))
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        g = torch.randn(local.shape, generator=gen) * 1e-3
        p.grad = torch.distributed.tensor.DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape,
                                                             stride=p.stride()) if hasattr(p, "to_local") else g
    times, cpu = [], []
    for i in range(repeats + 1):
        if sharded:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    backends = ", ".join(f"{b} {n}" for b, n in opt.last_backends.items())
    del opt
    return statistics.median(times[1:]), statistics.median(cpu[1:]), backends


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-124m", choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=OPTIMIZERS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODELS[args.model]))
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    sharded = {}
    for name in args.only:
        ms, cpu, backends = step_ms(model, name, args.repeats, True)
        worst = torch.tensor([ms, cpu])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank's does
        sharded[name] = (worst[0].item(), worst[1].item(), backends)
    del model
    if rank == 0:
        torch.manual_seed(0)
        whole = GPT(GPTConfig(**MODELS[args.model]))
        n = sum(p.numel() for p in whole.parameters())
        print(f"{args.model}: {n:,} parameters, {world} ranks x 1 thread (FSDP2) vs 1 process x 1 thread; "
              f"median of {args.repeats} steps")
        print(f"{'optimizer':<12} {'sharded ms':>11} {'1 thread ms':>12} {'per element':>12} {f'{world} threads ms':>13} "
              f"{'same cores':>11} {'cpu':>7}  backends (sharded / unsharded)")
        for name in args.only:
            torch.set_num_threads(1)
            ms, cpu, backends = step_ms(whole, name, args.repeats, False)
            torch.set_num_threads(world)  # the same cores as the ranks use together
            ms_all, _, _ = step_ms(whole, name, args.repeats, False)
            wall, cpu_sharded, used = sharded[name]
            print(f"{name:<12} {wall:>11.1f} {ms:>12.1f} {wall / (ms / world):>11.2f}x {ms_all:>13.1f} {wall / ms_all:>10.2f}x "
                  f"{cpu_sharded / (cpu / world):>6.2f}x  {used} / {backends}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
