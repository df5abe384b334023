"""One rank of the 2-process DDP test (run by tests/test_distributed.py, not by pytest).

Usage: python distributed_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR
Trains every registry optimizer for STEPS steps on its share of each global batch under
DistributedDataParallel (gloo), and rank 0 saves the final parameters per optimizer.
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))

import leanopt  # noqa: E402
from helpers import batch, tiny_model  # noqa: E402
from test_battery import CASES  # noqa: E402

STEPS = 10
GLOBAL_BATCH = 8


def train(name: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    model = tiny_model()
    wrapped = DDP(model) if world > 1 else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = leanopt.create_optimizer(name, wrapped, lr=CASES[name].lr, **CASES[name].kwargs)
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step, size=GLOBAL_BATCH)
        opt.zero_grad(set_to_none=True)
        wrapped(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])[1].backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in leanopt.list_optimizers():
            state = train(name, rank, world)
            if rank == 0:
                torch.save(state, os.path.join(out, f"{name}.pt"))
    finally:
        dist.destroy_process_group()
