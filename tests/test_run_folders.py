"""A run folder is identified by what it computes: another configuration is refused (or
moved aside, never deleted), two processes never train one run, and the temporaries of a
killed writer do not outlive its next run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import one_run_smoke
from helpers import strip_timing
from leanopt.bench.rundir import RunConflict, RunLocked, atomic_write, remove_stale_temporaries
from leanopt.bench.tasks import run_task
from leanopt.bench.train import read_results
from leanopt.cli import main

QUIET = dict(progress=False, log=lambda s: None)


def run_dir_of(out: Path, task) -> Path:
    return out / task.name / "runs" / task.runs[0].key


def test_a_rerun_with_another_configuration_refuses_and_names_the_fields(bench_data, tmp_path):
    task = one_run_smoke()
    run_task(task, tmp_path, bench_data, **QUIET)
    run = run_dir_of(tmp_path, task)
    summary = (run / "summary.json").read_bytes()
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["train"]["bf16"] is False and len(recorded["fingerprint"]) == 16

    bf16 = replace(task, train=replace(task.train, bf16=True))
    with pytest.raises(RunConflict, match=r"train\.bf16: False -> True.*another --out.*--overwrite"):
        run_task(bf16, tmp_path, bench_data, **QUIET)
    assert (run / "summary.json").read_bytes() == summary  # nothing lost

    run_task(bf16, tmp_path, bench_data, overwrite=True, **QUIET)
    aside = [p for p in run.parent.iterdir() if p.name.startswith(run.name + ".replaced-")]
    assert len(aside) == 1 and (aside[0] / "summary.json").read_bytes() == summary  # moved, not deleted
    assert json.loads((run / "summary.json").read_text())["train"]["bf16"] is True


def test_the_cli_says_so_in_one_line(bench_data, tmp_path, capsys):
    args = ["bench", "smoke", "--data-dir", str(bench_data), "--corpus", "src", "--out", str(tmp_path), "--seeds", "0"]
    task = one_run_smoke()
    run_task(replace(task, runs=task.runs[:1]), tmp_path, bench_data, **QUIET)  # the first run of the preset, in fp32
    capsys.readouterr()
    assert main(args + ["--bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.bf16" in err and "--overwrite" in err and "Traceback" not in err


def test_a_run_held_by_a_live_process_is_refused_and_a_stale_lock_is_taken_over(bench_data, tmp_path):
    task = one_run_smoke()
    run = run_dir_of(tmp_path, task)
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(RunLocked, match=rf"being trained by process {holder.pid}"):
            run_task(task, tmp_path, bench_data, **QUIET)
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale
    run_task(task, tmp_path, bench_data, **QUIET)
    assert (run / "summary.json").is_file() and not (run / ".lock").exists()


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint.pt.{int(dead.stdout)}.abc123.tmp"
    live = tmp_path / f".results.jsonl.{os.getpid() + 0}.def456.tmp"
    old_format = tmp_path / ".summary.json.xyz.tmp"  # leanopt < 0.2 did not name the writer
    for p in (stale, live, old_format):
        p.write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".report.md.{holder.pid}.0000.tmp"
        alive.write_bytes(b"being written")
        removed = set(remove_stale_temporaries(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert removed == {stale, live, old_format}  # this process writes nothing now: its own count as stale
    assert alive.exists()


def test_a_finished_run_loses_its_dead_writers_temporaries_at_the_next_run(bench_data, tmp_path):
    task = one_run_smoke()
    run_task(task, tmp_path, bench_data, **QUIET)
    run = run_dir_of(tmp_path, task)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run / f".checkpoint.pt.{int(dead.stdout)}.abc123.tmp"
    stale.write_bytes(b"partial")
    summary = (run / "summary.json").read_bytes()
    run_task(task, tmp_path, bench_data, **QUIET)  # nothing to redo
    assert not stale.exists() and (run / "summary.json").read_bytes() == summary


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from leanopt.bench.tasks import run_task
    sys.path.insert(0, {tests!r})
    from conftest import one_run_smoke

    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **k):  # the second checkpoint dies half-written, as under kill -9
        calls.append(1)
        if len(calls) == 2 and isinstance(obj, dict) and "optim" in obj:
            f.write(b"PK" + b"\\0" * 4096)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)

    torch.save = dying_save
    run_task(one_run_smoke(checkpoint_every=4), {out!r}, {data!r}, progress=False, log=lambda s: None)
""")


def test_a_run_killed_while_writing_its_checkpoint_leaves_nothing_behind_after_the_next(bench_data, tmp_path):
    task = one_run_smoke(checkpoint_every=4)
    run_task(task, tmp_path / "straight", bench_data, **QUIET)
    script = KILLER.format(tests=str(Path(__file__).parent), out=str(tmp_path / "killed"), data=str(bench_data))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = run_dir_of(tmp_path / "killed", task)
    assert list(run.glob(".checkpoint.pt.*.tmp")), "the kill should have left a partial checkpoint"
    run_task(task, tmp_path / "killed", bench_data, **QUIET)  # resumes from the first checkpoint
    assert not list((tmp_path / "killed").rglob("*.tmp")) and not (run / ".lock").exists()
    assert strip_timing(read_results(run / "results.jsonl")) == strip_timing(read_results(run_dir_of(tmp_path / "straight", task) / "results.jsonl"))
