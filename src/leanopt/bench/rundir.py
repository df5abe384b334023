"""Run folders: what a run computes, who is training it, and what its writers left behind.

A run folder is identified by the configuration that determines its result. The folder
records that configuration (``config.json``, with its hash); a later command whose
configuration differs refuses, names the fields that differ, and offers the two ways out
(another ``--out``, or ``--overwrite``, which moves the old folder aside and never
deletes it). A lock file (``.lock``, holding the trainer's pid and host) keeps two
processes from training one run at once; a lock whose process is gone is stale and taken
over. Temporary files (``.NAME.PID.XXXX.tmp``, written by :func:`atomic_write` next to
their target) whose writer is no longer running are removed when a run starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .config import ConfigError

__all__ = ["RunConflict", "RunLocked", "atomic_write", "write_json", "claim", "remove_stale_temporaries", "differences",
           "pid_alive"]

CONFIG = "config.json"
LOCK = ".lock"
_TMP = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


class RunConflict(ConfigError):
    """A run folder holds a run of another configuration."""


class RunLocked(ConfigError):
    """Another live process is training this run."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temporary file in the same folder and rename it into place, so a
    crash leaves either the old file or the new one, never half of one. The temporary is
    named after its target and this process (:func:`remove_stale_temporaries`); the file
    gets the permissions of an ordinary ``open()`` under the user's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the user's group
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:
        Path(tmp).unlink(missing_ok=True)
        if "PytorchStreamWriter" in str(e) or "inline_container" in str(e):  # torch.save's form of a failed write
            raise OSError(errno.EIO, "write failed (is the disk full?)", str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer is no longer running (a process
    killed while it wrote); returns them."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        m = _TMP.match(p.name)
        if m is not None and int(m["pid"]) != os.getpid() and pid_alive(int(m["pid"])):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``field: recorded → wanted`` for every field that differs (dotted names)."""
    a, b = _flat(recorded), _flat(wanted)
    missing = object()
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}".replace(repr(missing), "(absent)")
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _recorded(run_dir: Path, read_checkpoint_fingerprint: Callable[[Path], str | None]) -> dict[str, Any] | None:
    """The configuration a run folder was made with: its ``config.json``, else (folders of
    earlier versions) what its summary or checkpoint says; None for an empty folder."""
    cfg = run_dir / CONFIG
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunConflict(f"{cfg} is unreadable; rerun with --overwrite to move this run aside and start it afresh") from None
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunConflict(f"{summary} is unreadable; rerun with --overwrite to move this run aside") from None
        return {"fingerprint": s.get("fingerprint"), "train": s.get("train"),
                "run": {k: s.get(k) for k in ("label", "optimizer", "lr", "kwargs", "accum", "seed", "group")}}
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.is_file():
        return {"fingerprint": read_checkpoint_fingerprint(ckpt)}
    return None


def _aside(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    return dest


class _Lock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def acquire(self, what: str) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                    holder = {}  # half-written by a writer killed at that moment: stale
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == me["host"] and pid_alive(pid) and pid != me["pid"]:
                    raise RunLocked(f"{what} is being trained by process {pid} (lock {self.path}); wait for it to finish")
                if isinstance(pid, int) and host not in (None, me["host"]):
                    raise RunLocked(f"{what} is locked by process {pid} on host {host} ({self.path}); "
                                    "delete that file if no such process runs")
                self.path.unlink(missing_ok=True)  # stale: its holder is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise RunLocked(f"could not take the lock {self.path}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def claim(run_dir: Path, config: Mapping[str, Any], *, what: str, overwrite: bool = False,
          read_checkpoint_fingerprint: Callable[[Path], str | None] = lambda p: None,
          log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``run_dir`` for training the run ``config`` (with a ``"fingerprint"`` entry):
    refuse a folder of another configuration (or, with ``overwrite``, move it aside),
    take the lock, remove dead writers' temporaries, record the configuration; release
    the lock on the way out, however it is left."""
    recorded = _recorded(run_dir, read_checkpoint_fingerprint)
    if recorded is not None and recorded.get("fingerprint") != config["fingerprint"]:
        if not overwrite:
            diff = differences({k: v for k, v in recorded.items() if k != "fingerprint"},
                               {k: v for k, v in config.items() if k != "fingerprint"})
            detail = "; ".join(diff[:8]) + ("; ..." if len(diff) > 8 else "") if diff else "the recorded configuration hash"
            raise RunConflict(f"{what} in {run_dir} was made with another configuration ({detail}). Use another --out "
                              "for the new run, or --overwrite to move the old one aside (it is kept, never deleted)")
        dest = _aside(run_dir)
        run_dir.rename(dest)
        log(f"moved the earlier {what} aside to {dest}")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _Lock(run_dir / LOCK)
    lock.acquire(what)
    try:
        remove_stale_temporaries(run_dir)
        if not (run_dir / CONFIG).is_file():
            write_json(run_dir / CONFIG, dict(config))
        yield
    finally:
        lock.release()
