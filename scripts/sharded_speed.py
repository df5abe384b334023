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
Python). Sharded and concurrent steps are measured in alternating rounds, and the ratio is
the median of the rounds' ratios (with their range). "cpu": the concurrent ratio in CPU time
(``time.process_time``): a rank waiting for a core does not count.
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


def optimizer(model, name: str) -> torch.optim.Optimizer:
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
    opt.step()  # state created
    return opt


def step_ms(opt: torch.optim.Optimizer, repeats: int, together: bool) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``repeats`` steps; ``together``: every rank starts
    each step at once, and a step ends when the slowest rank's does."""
    times, cpu = [], []
    for _ in range(repeats):
        if together:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    wall, cpu_ms = statistics.median(times), statistics.median(cpu)
    if together:
        t = torch.tensor([wall, cpu_ms])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        wall, cpu_ms = t.tolist()
    return wall, cpu_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-124m", choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=5, help="steps per measurement (their median)")
    ap.add_argument("--rounds", type=int, default=5, help="sharded/concurrent measurement pairs (their ratios' median)")
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
    torch.manual_seed(0)
    whole = GPT(GPTConfig(**MODELS[args.model]))
    rows = []
    for name in args.only:
        sharded_opt, whole_opt = optimizer(model, name), optimizer(whole, name)
        # the two alternate, so that a slow spell of the machine falls on both of a pair
        pairs = [(step_ms(sharded_opt, args.repeats, True), step_ms(whole_opt, args.repeats, True))
                 for _ in range(args.rounds)]
        ratios = sorted(s[0] / (w[0] / world) for s, w in pairs)
        cpu = statistics.median(s[1] / (w[1] / world) for s, w in pairs)
        dist.barrier()
        alone = step_ms(whole_opt, args.repeats, False) if rank == 0 else None
        dist.barrier()
        used = ", ".join(f"{b} {n}" for b, n in sharded_opt.last_backends.items())
        rows.append((name, statistics.median(s[0] for s, _ in pairs), statistics.median(w[0] for _, w in pairs), ratios,
                     cpu, alone, used, ", ".join(f"{b} {n}" for b, n in whole_opt.last_backends.items())))
        del sharded_opt, whole_opt
    if rank == 0:
        n = sum(p.numel() for p in whole.parameters())
        print(f"{args.model}: {n:,} parameters, {world} ranks x 1 thread (FSDP2) vs 1 process x 1 thread; "
              f"{args.rounds} rounds of {args.repeats} steps")
        print(f"{'optimizer':<15} {'sharded ms':>10} {'concurrent ms':>13} {'per element':>11} {'(range)':>13} {'cpu':>6} "
              f"{'alone ms':>9} {'per element':>11}  backends (sharded / unsharded)")
        for name, ms, ms_c, ratios, cpu, alone, used, used_whole in rows:
            print(f"{name:<15} {ms:>10.1f} {ms_c:>13.1f} {statistics.median(ratios):>10.2f}x "
                  f"{f'{ratios[0]:.2f}-{ratios[-1]:.2f}':>13} {cpu:>5.2f}x {alone[0]:>9.1f} {ms / (alone[0] / world):>10.2f}x  "
                  f"{used} / {used_whole}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
