"""One rank of a data-parallel benchmark task, launched by ``torchrun`` (see
test_distributed.py): ``torchrun --nproc_per_node=N parallel_bench_worker.py MODE DATA OUT``.
It runs what ``leanopt bench --parallel MODE`` runs, on the small task of ``TASK``."""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from leanopt.bench.config import RunSpec
from leanopt.bench.parallel import init_data_parallel
from leanopt.bench.tasks import get_task, run_task

# the optimizers whose statistics span shards (block means, g-SNR, mask sums) and PMA's state
RUNS = (
    RunSpec("adam-mini", "adam-mini", 4e-3, {"weight_decay": 0.1}),
    RunSpec("sgd-sai", "sgd-sai", 4e-2, {"weight_decay": 0.1}),
    RunSpec("alpha-adam", "alpha-adam", 4e-3, {"weight_decay": 0.1}),
    RunSpec("pma", "adamw-pma", 4e-3, {"period": 3}),
)


def task():
    smoke = get_task("smoke", corpus="src")
    return replace(smoke, runs=RUNS, train=replace(smoke.train, micro_steps=12, eval_every=4, checkpoint_every=2))


if __name__ == "__main__":
    mode, data_dir, out = sys.argv[1:4]
    torch.set_num_threads(1)
    dp = init_data_parallel(mode, "cpu")
    run_task(task(), out, data_dir, progress=False, log=lambda *a: None, dp=dp)
    torch.distributed.destroy_process_group()
