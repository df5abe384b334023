"""Every user error is one clear line and a non-zero exit, never a traceback (``--debug``
shows it); Ctrl-C says how to resume."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import one_run_smoke
from leanopt.cli import main


def bench(data, out, *extra):
    return ["bench", "smoke", "--data-dir", str(data), "--corpus", "src", "--out", str(out), "--seeds", "0", *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("leanopt: error: ")
    return err


def test_an_output_folder_that_cannot_be_written(bench_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(bench(bench_data, blocker / "runs")) == 1
    assert str(blocker) in one_line(capsys)


def test_a_read_only_file_system_and_a_full_disk(bench_data, tmp_path, capsys, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "runs"))

    monkeypatch.setattr("leanopt.bench.rundir.os.replace", read_only)
    assert main(bench(bench_data, tmp_path / "runs")) == 1
    assert "read-only" in one_line(capsys)
    monkeypatch.undo()

    import torch

    def full(obj, f, *a, **k):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")

    monkeypatch.setattr(torch, "save", full)
    assert main(bench(bench_data, tmp_path / "full")) == 1
    err = one_line(capsys)
    assert "disk full" in err and "checkpoint.pt" in err
    assert not list((tmp_path / "full").rglob("*.tmp"))


def test_a_garbage_checkpoint(bench_data, tmp_path, capsys):
    task = one_run_smoke()
    run = tmp_path / "smoke" / "runs" / task.runs[0].key
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"\x80\x04garbage")
    assert main(bench(bench_data, tmp_path)) == 2
    err = one_line(capsys)
    assert "checkpoint" in err and "unreadable" in err and "--overwrite" in err and "weights_only" not in err


def test_a_foreign_summary(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"hello": "world"}))
    assert main(["report", str(tmp_path)]) == 2
    assert "not a leanopt task summary" in one_line(capsys)


def test_a_transformers_config_whose_heads_do_not_divide_the_width(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_embd": 10, "n_head": 3, "n_layer": 1, "vocab_size": 50,
                               "bos_token_id": 0, "eos_token_id": 0}))
    assert main(["partition", "--hf-config", str(cfg)]) == 2
    err = one_line(capsys)
    assert "could not build a 'gpt2' model" in err and "no model class" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(Exception):
        main(["report", str(tmp_path), "--debug"])


def test_ctrl_c_says_how_to_resume(bench_data, tmp_path):
    out = tmp_path / "runs"
    # SIGINT as a terminal delivers it, also when this suite itself runs in the background
    # (a shell's background jobs inherit SIGINT ignored, and Python then keeps it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "leanopt", *bench(bench_data, out)], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(out.rglob(".lock")) and time.time() < deadline:  # training has begun
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert not list(out.rglob(".lock"))  # the lock went with the process
    assert "it/s" not in err and "step/s" not in err  # no progress bars: stderr is not a terminal
