"""Optimizer-step time on FSDP2 shards against the same optimizer unsharded, per element.

    torchrun --nproc_per_node=2 scripts/sharded_speed.py [--model gpt2-124m] [--repeats 5]

Every rank steps its shard of a model of :data:`leanopt.bench.speed.MODELS` (one thread per
rank, random gradients). Then the whole model, unsharded, one thread: "alone", rank 0 only;
"concurrent", every rank its own copy at the same time, so that the ranks share the
machine's memory bandwidth as they do when sharded (on a machine whose cores share one
memory, two memory-bound processes each run at about half speed; GPUs of a node do not
share memory). Each "per element" ratio is the sharded step's time over the unsharded step's
share of it (its time divided by the world size): 1.0 means sharding costs nothing; the
"concurrent" one is the cost of sharding itself (collectives, the passes over split blocks,
Python). "cpu": the concurrent ratio in CPU time (``time.process_time``): a rank waiting for
a core does not count.
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


def step_ms(model, name: str, repeats: int, together: bool) -> tuple[float, float, str]:
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
        if together:  # every rank starts the step at once
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

    def slowest(*values: float) -> list[float]:  # a step ends when the slowest rank's does
        t = torch.tensor(values)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODELS[args.model]))
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    sharded = {}
    for name in args.only:
        ms, cpu, backends = step_ms(model, name, args.repeats, True)
        sharded[name] = (*slowest(ms, cpu), backends)
    del model
    torch.manual_seed(0)
    whole = GPT(GPTConfig(**MODELS[args.model]))
    concurrent, alone = {}, {}
    for name in args.only:
        ms, cpu, _ = step_ms(whole, name, args.repeats, True)  # every rank its own whole model
        concurrent[name] = slowest(ms, cpu)
        dist.barrier()
        if rank == 0:
            alone[name] = step_ms(whole, name, args.repeats, False)
        dist.barrier()
    if rank == 0:
        n = sum(p.numel() for p in whole.parameters())
        print(f"{args.model}: {n:,} parameters, {world} ranks x 1 thread (FSDP2) vs 1 process x 1 thread; "
              f"median of {args.repeats} steps")
        print(f"{'optimizer':<15} {'sharded ms':>10} {'alone ms':>9} {'per element':>11} {'concurrent ms':>13} "
              f"{'per element':>11} {'cpu':>6}  backends (sharded / unsharded)")
        for name in args.only:
            wall, cpu_sharded, used = sharded[name]
            ms, _, backends = alone[name]
            ms_c, cpu_c = concurrent[name]
            print(f"{name:<15} {wall:>10.1f} {ms:>9.1f} {wall / (ms / world):>10.2f}x {ms_c:>13.1f} "
                  f"{wall / (ms_c / world):>10.2f}x {cpu_sharded / (cpu_c / world):>5.2f}x  {used} / {backends}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
