"""Every optimizer under DistributedDataParallel and under FSDP2 (2 gloo processes on the
CPU) equals a single process on the same global batch; optimizer state checkpointed with
``torch.distributed.checkpoint`` resumes exactly, also resharded from 2 ranks to 1 and
back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import leanopt
from distributed_worker import DCP_OPTIMIZERS, FSDP_UNSUPPORTED, STRADDLING, train

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def launch(mode: str, world: int, out, *extra: str) -> None:
    out.mkdir(exist_ok=True)
    init = out / f"init-{mode}-{world}-{len(os.listdir(out))}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, WORKER, mode, str(rank), str(world), str(init), str(out), *extra], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def rel(a: dict, b: dict) -> tuple[float, str]:
    return max((((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item(), k) for k in b)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch("ddp", 2, out)
    return out


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    launch("fsdp", 2, out)
    return out


@pytest.mark.parametrize("name", leanopt.list_optimizers())
def test_ddp_two_processes_equal_one(ddp_results, name):
    distributed = torch.load(ddp_results / f"{name}.pt", weights_only=True)
    diff, key = rel(distributed, train(name))
    assert diff <= 1e-5, f"{name}: {key} differs by {diff:.2e}"


@pytest.mark.parametrize("name", [n for n in leanopt.list_optimizers() if n not in FSDP_UNSUPPORTED])
def test_fsdp2_two_processes_equal_one(fsdp_results, name):
    # heads and norm blocks straddle the shards: Adam-mini's block means, SGD-SaI's g-SNR
    # and AlphaAdam's mask sums must be taken over the whole block
    sharded = torch.load(fsdp_results / f"{name}.pt", weights_only=True)
    diff, key = rel(sharded, train(name, **STRADDLING))
    assert diff <= 1e-5, f"{name}: {key} differs by {diff:.2e}"


def test_fsdp2_state_is_sharded(fsdp_results):
    sizes = [json.loads((fsdp_results / f"state_bytes_rank{r}.json").read_text()) for r in range(2)]
    for name in sizes[0]:
        per_rank = [s[name] for s in sizes]
        total = sum(per_rank)
        if total == 0:  # stateless
            continue
        # each rank holds about half: the shards of the per-element state, plus small replicated parts
        assert max(per_rank) <= 0.56 * total, f"{name}: per-rank state bytes {per_rank}"


def test_dcp_checkpoint_resumes_exactly_and_reshards(tmp_path):
    # 2 ranks: 5 steps, save, 5 more (A) | 1 rank: load, save again, 5 more (B) | 2 ranks: load that, 5 more (C)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    launch("dcp", 2, a, "", str(tmp_path / "ckpt2"))
    launch("dcp", 1, b, str(tmp_path / "ckpt2"), str(tmp_path / "ckpt1"))
    launch("dcp", 2, c, str(tmp_path / "ckpt1"), "")
    for name in DCP_OPTIMIZERS:
        ref = torch.load(a / f"{name}.pt", weights_only=True)
        for d in (b, c):
            diff, key = rel(torch.load(d / f"{name}.pt", weights_only=True), ref)
            assert diff <= 1e-5, f"{name} ({d.name}): {key} differs by {diff:.2e}"
