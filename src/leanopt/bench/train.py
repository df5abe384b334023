"""The benchmark's training loop.

One run = one optimizer on one model and corpus, for a fixed number of micro-batches:
micro-batches with gradient accumulation (``accum``), warm-up + cosine lr schedule,
periodic validation, optional bf16 autocast, and the same data order for every optimizer
(micro-batch ``i`` of seed ``s`` is always the same windows). Metrics go to
``results.jsonl``; checkpoints (model, optimizer, scheduler, metrics) make a run killed
at any moment restart where it stopped and end with an identical result. Every file is
written atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..models import GPT, PRESETS
from ..models.hf import build_hf_model, load_hf_config
from ..registry import create_optimizer, state_bytes
from .config import PEER_PREFIX, RunSpec, TrainConfig, fingerprint
from .data import Corpus
from .rundir import RunConflict, atomic_write, claim, remove_stale_temporaries, write_json
from .parallel import DataParallel

__all__ = ["Batches", "train_run", "build_run_model", "lr_lambda", "Interrupted", "read_results", "evaluate"]

# checkpoints hold full state dicts keyed by parameter name (torch.distributed.checkpoint's
# get_model_state_dict / get_optimizer_state_dict): one file serves any world size
_CHECKPOINT_FORMAT = 2
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Interrupted(Exception):
    """Raised by the ``stop_after`` test hook, as if the process had been killed there."""


class Batches:
    """Random windows of ``seq_len + 1`` tokens; micro-batch ``index`` depends only on
    ``(seed, index)``, so every optimizer (and every restart) sees the same data."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, seed: int) -> None:
        if tokens.size < seq_len + 2:
            raise ValueError(f"corpus split has {tokens.size} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.seq_len, self.micro_batch, self.seed = tokens, seq_len, micro_batch, seed

    def windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        x = torch.from_numpy(rows)
        return x[:, :-1], x[:, 1:]

    def get(self, index: int, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``index``, or only its rows ``part`` (a data-parallel rank's slice)."""
        rng = np.random.default_rng([self.seed, index])
        return self.windows(rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.micro_batch)[part])

    def evenly_spaced(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed validation set: windows spread evenly over the split."""
        n = n_batches * self.micro_batch
        starts = np.linspace(0, self.tokens.size - self.seq_len - 1, n).astype(np.int64)
        return [self.windows(starts[i * self.micro_batch : (i + 1) * self.micro_batch]) for i in range(n_batches)]


class _HFCausalLM(nn.Module):
    """A transformers causal LM behind the ``(logits, loss)`` interface of :class:`GPT`;
    ``config`` and the embeddings stay reachable for Adam-mini's partition."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, idx, targets=None):
        logits = self.model(input_ids=idx).logits
        loss = None if targets is None else F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def build_run_model(train: TrainConfig, vocab_size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    spec = train.model
    if spec.hf_config is not None:
        config = load_hf_config(spec.hf_config)
        config.vocab_size = vocab_size
        for k, v in spec.overrides.items():
            setattr(config, k, v)
        return _HFCausalLM(build_hf_model(config, meta=False, causal_lm=True))
    return GPT(replace(PRESETS[spec.preset], vocab_size=vocab_size, **spec.overrides))


def lr_lambda(steps: int, warmup_frac: float, min_lr_frac: float):
    warmup = int(round(warmup_frac * steps))

    def factor(s: int) -> float:  # s = optimizer steps taken so far
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(1, steps - warmup)
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: str, bf16: bool, dp: DataParallel = DataParallel()) -> float:
    """Mean validation loss; under data parallelism each rank takes its rows of every batch."""
    model.eval()
    total = 0.0
    for x, y in batches:
        rows = dp.part(x.shape[0])
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x[rows].to(device), y[rows].to(device))
        total += loss.item()
    model.train()
    return dp.mean(total / len(batches))


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_results(path: Path, metrics: list[dict]) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics)), mode="w")


def train_run(
    run_dir: Path,
    train: TrainConfig,
    run: RunSpec,
    corpus: Corpus,
    *,
    init_state: dict[str, torch.Tensor] | None = None,
    save_model: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    dp: DataParallel = DataParallel(),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one run in ``run_dir`` (resuming its checkpoint if there is one) and return
    its summary. A finished run (``summary.json`` with this configuration) is not redone;
    a folder holding a run of another configuration is refused, or with ``overwrite``
    moved aside (:func:`leanopt.bench.rundir.claim`).

    ``stop_after``: raise :class:`Interrupted` once this many micro-batches are done and
    checkpointed, as a kill at that moment would leave things (for tests).
    ``dp``: this process's rank in a data-parallel run (:mod:`leanopt.bench.parallel`);
    every rank calls this, rank 0 alone writes.
    """
    fp = fingerprint(train, run)
    done = finished(run_dir, train, run)
    if done is not None:
        if dp.is_main:  # a finished run is not redone, but what a killed writer left goes
            remove_stale_temporaries(run_dir)
        return done
    config = {"fingerprint": fp, "train": asdict(train), "run": asdict(run)}
    # rank 0 holds the folder (the others only read what it writes)
    held = claim(run_dir, json.loads(json.dumps(config, default=str)), what=f"run {run.key!r}", overwrite=overwrite,
                 read_checkpoint_fingerprint=_checkpoint_fingerprint, log=log) if dp.is_main else contextlib.nullcontext()
    with held:
        return _train(run_dir, train, run, corpus, fp, init_state=init_state, save_model=save_model, progress=progress,
                      stop_after=stop_after, dp=dp)


def finished(run_dir: Path, train: TrainConfig, run: RunSpec) -> dict[str, Any] | None:
    """The summary of ``run`` if ``run_dir`` holds it finished with this configuration, else
    None (nothing there, unfinished, another configuration, or unreadable: claim() decides)."""
    try:
        done = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return done if done.get("fingerprint") == fingerprint(train, run) else None


def _checkpoint_fingerprint(path: Path) -> str | None:
    return _load_checkpoint(path).get("fingerprint")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickles: the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise RunConflict(f"checkpoint {path} is unreadable ({type(e).__name__}); rerun with --overwrite to move this run "
                          "aside and start it afresh") from None


@dataclass
class _Session:
    """One run's training in progress: what resume, the loop and the summary share."""

    run_dir: Path
    train: TrainConfig
    run: RunSpec
    fp: str
    dp: DataParallel
    device: str
    steps: int  # optimizer steps of the whole run
    model: nn.Module
    net: nn.Module  # the model as the data-parallel wrapper runs it
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    data: Batches
    val: list
    metrics: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    wall_before: float = 0.0  # seconds trained before the latest resume

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"


def _train(run_dir: Path, train: TrainConfig, run: RunSpec, corpus: Corpus, fp: str, *,
           init_state: dict[str, torch.Tensor] | None, save_model: bool, progress: bool, stop_after: int | None,
           dp: DataParallel) -> dict[str, Any]:
    dp.barrier()  # rank 0 holds the folder now (and may have moved an old run aside)
    dp.check(train.micro_batch)
    device = dp.device or train.device
    model = build_run_model(train, corpus.vocab_size, run.seed)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    net = dp.wrap(model, device)  # FSDP2 shards model's parameters in place: the optimizer comes after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Adam-mini's partition notes on exotic models
        opt = build_optimizer(run.optimizer, model, lr=run.lr, **run.kwargs)
    steps = run.steps(train)
    session = _Session(run_dir, train, run, fp, dp, device, steps, model, net, opt,
                       torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, train.warmup_frac, train.min_lr_frac)),
                       Batches(corpus.train, train.seq_len, train.micro_batch, run.seed),
                       Batches(corpus.val, train.seq_len, train.micro_batch, 0).evenly_spaced(train.eval_batches))
    _resume(session)
    wall = _loop(session, progress=progress, stop_after=stop_after)
    summary = _summary(session, wall)
    state = get_model_state_dict(model, options=_FULL) if save_model else None
    if dp.is_main:
        if state is not None:
            atomic_write(run_dir / "model.pt", lambda f: torch.save(state, f))
        _write_results(run_dir / "results.jsonl", session.metrics)
        write_json(run_dir / "summary.json", summary)
        session.ckpt_path.unlink(missing_ok=True)
    dp.barrier()  # the other ranks may read what rank 0 wrote (a base model, a summary)
    return summary


def _resume(s: _Session) -> None:
    """Continue from the run's checkpoint, if it holds this configuration."""
    if not s.ckpt_path.is_file():
        return
    ckpt = _load_checkpoint(s.ckpt_path)
    if ckpt.get("fingerprint") == s.fp and ckpt.get("format") == _CHECKPOINT_FORMAT:
        set_model_state_dict(s.model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(s.model, s.opt, ckpt["optim"], options=StateDictOptions(full_state_dict=True))
        s.sched.load_state_dict(ckpt["sched"])
        s.step, s.metrics, s.wall_before = ckpt["step"], ckpt["metrics"], ckpt["wall_s"]
    elif s.dp.is_main:  # the same configuration, an earlier checkpoint format: nothing to resume from
        warnings.warn(f"{s.ckpt_path} was written by an earlier leanopt version; starting {s.run.key} afresh")


def _checkpoint(s: _Session, wall: float) -> None:
    # full state dicts, keyed by parameter name: the same file for any world size
    model_state, optim_state = get_model_state_dict(s.model, options=_FULL), get_optimizer_state_dict(s.model, s.opt, options=_FULL)
    if s.dp.is_main:
        blob = {"fingerprint": s.fp, "format": _CHECKPOINT_FORMAT, "step": s.step, "model": model_state, "optim": optim_state,
                "sched": s.sched.state_dict(), "metrics": s.metrics, "wall_s": wall}
        atomic_write(s.ckpt_path, lambda f: torch.save(blob, f))
        _write_results(s.run_dir / "results.jsonl", s.metrics)


def _position(s: _Session) -> dict[str, int]:
    micro = s.step * s.run.accum
    return {"step": s.step, "micro": micro, "samples": micro * s.train.micro_batch,
            "tokens": micro * s.train.micro_batch * s.train.seq_len}


def _record_val(s: _Session, wall: float) -> None:
    """A validation point; ``wall``: the run's seconds so far (training and validations,
    across resumes), so that a loss can be placed in time as well as in tokens."""
    s.metrics.append({"kind": "val", **_position(s), "loss": evaluate(s.net, s.val, s.device, s.train.bf16, s.dp),
                      "wall_s": wall})


def _loop(s: _Session, *, progress: bool, stop_after: int | None) -> float:
    """Train from ``s.step`` to the end (or a divergence); returns the run's wall seconds."""
    train, run, dp, device = s.train, s.run, s.dp, s.device
    rows = dp.part(train.micro_batch)
    bar = None
    if progress and dp.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=s.step, desc=run.key, unit="step", leave=False, dynamic_ncols=True)
    t_start = time.perf_counter()
    elapsed = lambda: s.wall_before + time.perf_counter() - t_start  # noqa: E731
    if s.step == 0:
        _record_val(s, 0.0)
    ckpt_every = train.checkpoint_every or train.eval_every
    s.model.train()
    while s.step < s.steps:
        t_step = time.perf_counter()
        s.opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for k in range(run.accum):
            x, y = s.data.get(s.step * run.accum + k, rows)
            with dp.accumulating(s.net, sync=k == run.accum - 1):
                with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=train.bf16):
                    _, loss = s.net(x.to(device), y.to(device))
                (loss / run.accum).backward()
            loss_sum += loss.item()
        loss_sum = dp.mean(loss_sum)  # every rank sees the same loss: they stop (diverged) together
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        s.opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt_ms, step_ms = (t1 - t0) * 1000, (t1 - t_step) * 1000
        lr = float(s.opt.param_groups[0]["lr"])  # (a tensor in some optimizers: torchao's)
        s.sched.step()
        s.step += 1
        s.metrics.append({"kind": "train", **_position(s), "lr": lr, "loss": loss_sum / run.accum, "opt_ms": opt_ms,
                          "step_ms": step_ms})
        micro = s.metrics[-1]["micro"]
        if not math.isfinite(loss_sum):
            # diverged: nothing more to learn from this run (a grid has many such)
            s.metrics[-1]["diverged"] = True
            break
        if micro % train.eval_every == 0 or s.step == s.steps:
            _record_val(s, elapsed())
        if micro % ckpt_every == 0 or s.step == s.steps:
            _checkpoint(s, elapsed())
            if stop_after is not None and micro >= stop_after and s.step < s.steps:
                raise Interrupted(f"stopped after {micro} micro-batches")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / run.accum:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return elapsed()


def _summary(s: _Session, wall: float) -> dict[str, Any]:
    train, run, metrics = s.train, s.run, s.metrics
    vals = [m for m in metrics if m["kind"] == "val"]
    diverged = any(m.get("diverged") for m in metrics) or not math.isfinite(vals[-1]["loss"])
    steps = [m for m in metrics if m["kind"] == "train"]
    steps = steps[3:] or steps  # the first steps allocate the state and warm the caches
    times = [m["opt_ms"] for m in steps]
    step_ms = statistics.median(m.get("step_ms", math.nan) for m in steps)
    params = list(s.model.parameters())
    return {
        "fingerprint": s.fp,
        "key": run.key,
        "label": run.label,
        "group": run.group_name,
        "optimizer": run.optimizer,
        "kwargs": run.kwargs,
        "lr": run.lr,
        "accum": run.accum,
        "seed": run.seed,
        "steps": s.steps,
        "micro_steps": train.micro_steps,
        "samples": train.micro_steps * train.micro_batch,
        "tokens": train.micro_steps * train.micro_batch * train.seq_len,
        "final_val": float("nan") if diverged else vals[-1]["loss"],
        "best_val": min(v["loss"] for v in vals),
        # [samples, tokens, loss, wall seconds] per validation
        "val_curve": [[v["samples"], v["tokens"], v["loss"], v.get("wall_s", math.nan)] for v in vals],
        "diverged": diverged,
        "n_params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "state_bytes": state_bytes(s.opt, whole=True),
        "state_bytes_rank0": state_bytes(s.opt),  # FSDP2 / TP shard the state: about state_bytes / world_size
        "world_size": s.dp.world,
        "parallel": s.dp.mode,
        # which implementation stepped the tensors (leanopt's router; torch's own are named by their flags)
        "implementation": implementation(s.opt),
        "opt_step_ms": statistics.median(times),
        "opt_step_ms_p10": float(np.percentile(times, 10)),
        "opt_step_ms_p90": float(np.percentile(times, 90)),
        "step_ms": step_ms,  # median training step: forward, backward and optimizer
        "opt_share": statistics.median(times) / step_ms,
        "tokens_per_s": run.accum * train.micro_batch * train.seq_len / (step_ms / 1000),
        "wall_s": wall,
        "train": asdict(train),
    }


def build_optimizer(name: str, model: torch.nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    """A registry optimizer (:func:`leanopt.registry.create_optimizer`), or a peer's named
    ``"torchao:CLASS"`` (torchao.optim's, e.g. ``AdamW8bit``: the precision preset compares
    leanopt's compact state with it where torchao is installed)."""
    if name.startswith(PEER_PREFIX):
        import torchao.optim

        return getattr(torchao.optim, name.removeprefix(PEER_PREFIX))(model.parameters(), **kwargs)
    return create_optimizer(name, model, **kwargs)


def implementation(opt: torch.optim.Optimizer) -> str:
    """How ``opt`` ran its latest step, in words: leanopt's backends with their tensor
    counts (``native 12, eager 1``), or a torch optimizer's ``fused``/``foreach`` flag."""
    backends = getattr(opt, "last_backends", None)
    if backends:
        return ", ".join(f"{b} {n}" for b, n in backends.items())
    if not type(opt).__module__.startswith("torch."):  # a peer's optimizer: its class
        return f"{type(opt).__module__.partition('.')[0]} {type(opt).__name__}"
    group = opt.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"
