"""Every optimizer under DistributedDataParallel (2 gloo processes on the CPU) equals a
single process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import leanopt
from distributed_worker import train

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    init = out / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, WORKER, str(rank), "2", str(init), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return out


@pytest.mark.parametrize("name", leanopt.list_optimizers())
def test_ddp_two_processes_equal_one(ddp_results, name):
    distributed = torch.load(ddp_results / f"{name}.pt", weights_only=True)
    single = train(name)
    for key, ref in single.items():
        rel = ((distributed[key].double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel <= 1e-5, f"{name}: {key} differs by {rel:.2e}"
