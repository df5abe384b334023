"""Benchmark presets (``leanopt bench PRESET``) and the task runner.

Learning rates are part of the presets and come from one documented sweep, itself a
preset (``leanopt bench sweep``): every optimizer on the same short pre-training, its
lr on a grid of factors of two around a family default, the best final validation loss
wins (the default where it is within the claims' 1 % margin of the best, as in the sweeps
at longer horizons). The table :data:`LRS` holds the winners; nothing is tuned by hand
per optimizer. The presets at pretrain's horizon use :data:`PRETRAIN_LRS`, which a second sweep at that
horizon (``leanopt bench sweep-pretrain``) may move, by the rule stated beside it; pretrain-long uses
:data:`LONG_LRS`, which a third (``leanopt bench sweep-long``) may move from those, by the same rule.
Fine-tuning uses the same rule for every optimizer: ``FINETUNE_LR_FACTOR`` × its
pre-training lr, and the PMA optimizers use their baseline's lr (as the PMA paper, which
runs PMA and accumulation with identical hyperparameters).

Weight decay is decoupled (``p ← p·(1 − lr·wd)``), so its strength is ``lr·wd``; the
optimizers' learning rates differ by about 1000x (SGD-SaI 2.0, Lion 1.6e-3), and one fixed
``wd`` would decay some 1000x harder than others. Every optimizer therefore gets the same
strength, ``wd = DECAY / lr`` (AdamW's usual 0.1 at lr 2e-3; the Lion paper's own advice
of keeping ``lr·wd`` constant). torch's SGD decays through the gradient (L2), so the
plain-SGD baseline runs without decay except in the robustness grid.
"""

from __future__ import annotations

import importlib.util

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .config import PEER_PREFIX, ConfigError, ModelSpec, RunSpec, TrainConfig
from .data import DataError, load_corpus
from .memory import SCALE_MODELS, state_at_scale
from .rundir import remove_stale_temporaries, write_json
from .parallel import DataParallel
from .train import finished, train_run

__all__ = ["TaskSpec", "PRESETS", "LRS", "get_task", "run_task", "environment"]

# Winners of `leanopt bench sweep` (see the README's paragraph "Learning rates").
LRS: dict[str, float] = {
    "adam-mini-async": 4e-3,
    "sgd-sai-async": 2.0,
    "adamw": 2e-3,
    "adam-mini": 2e-3,
    "sgd-sai": 2.0,
    "alpha-adam": 4e-3,
    "cadamw": 4e-3,
    "lion": 1.6e-3,
    "sgd": 0.1,
}
# pretrain's horizon (1 200 steps) has a sweep of its own, `sweep-pretrain`. An optimizer keeps
# its LRS entry there unless that sweep's winner beats it by more than the claims' practical-
# equivalence margin (stats.MARGIN, 1 %): a gap the verdicts would call "on par" is not worth a
# preset that differs from the others. tests/test_bench.py checks this table against the kept runs.
PRETRAIN_LRS: dict[str, float] = {**LRS, "lion": LRS["lion"] / 4}  # Lion: 3.532 at 4e-4 against 4.036 at 1.6e-3
# pretrain-long's horizon (6 000 steps) has one too, `sweep-long`, centred on PRETRAIN_LRS, same rule.
# SGD-SaI's optimum moved up with the tokens: at lr 2 it ends 8.1 % behind lr 4 (3.301 against 3.053;
# lr 8: 4.218), the others' stayed
LONG_LRS: dict[str, float] = {**PRETRAIN_LRS, "sgd-sai": 4.0}
# the sweep grid: factors of two around a family default (SGD-SaI's momentum is an EMA,
# so its lr is ~1/(1-μ) = 10x that of torch's undampened SGD momentum)
SWEEP_CENTER = {"adamw": 4e-3, "adam-mini": 4e-3, "alpha-adam": 4e-3, "cadamw": 4e-3, "lion": 1.6e-3, "sgd-sai": 1.0, "sgd": 0.2,
                "adam-mini-async": 4e-3, "sgd-sai-async": 1.0}
SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
FINETUNE_LR_FACTOR = 0.3
# finetune's accumulation baselines have a sweep at finetune's horizon (`sweep-finetune`): a
# baseline, and the PMA runs beside it (which take its lr), keep FINETUNE_LR_FACTOR x its LRS
# entry unless that sweep's winner beats it by more than stats.MARGIN; then they take the
# winner, as this factor of the default (tests/test_bench.py checks it against the kept runs)
FINETUNE_LR_MOVES: dict[str, float] = {"adamw-accum4": 4.0, "adamw-accum8": 4.0, "lion-accum8": 2.0}
DECAY = 2e-4  # lr·wd: the decoupled weight decay's strength per step at peak lr, for every optimizer

QUICK_MODEL = ModelSpec("demo", {"dim": 96, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128})
DEMO_MODEL = ModelSpec("demo")
SMOKE_MODEL = ModelSpec("tiny", {"max_seq_len": 64})
GPU_MODEL = ModelSpec("gpt2-small", {"max_seq_len": 512})


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    train: TrainConfig
    runs: tuple[RunSpec, ...]
    claims: tuple[str, ...] = ()
    base: tuple[TrainConfig, RunSpec] | None = None  # pre-training whose model the runs start from
    kind: str = "pretrain"  # pretrain | finetune | robustness | sweep
    scale_models: tuple[str, ...] = SCALE_MODELS  # models whose state bytes the report adds (bench/memory.py)
    minutes: float = 0.0  # the whole preset's wall time on 2 CPU cores, estimated from measured runs (0: short)
    runs_from: str = ""  # the preset whose run folders these runs live in (a run both have is trained once)
    shorter: str = ""  # a preset of these optimizers at a shorter length: the report sets its gaps beside these

    def validate(self) -> None:
        self.train.validate()
        keys = set()
        for r in self.runs:
            r.validate(self.train)
            if r.key in keys:
                raise ConfigError(f"task {self.name!r}: two runs share the key {r.key!r}")
            keys.add(r.key)
        if self.base is not None:
            self.base[0].validate()
            self.base[1].validate(self.base[0])
        if not self.runs:
            raise ConfigError(f"task {self.name!r} has no runs")


def _opt_kwargs(name: str, lr: float) -> dict[str, Any]:
    return {} if name == "sgd" else {"weight_decay": DECAY / lr}


def _seeded(runs: list[RunSpec], seeds: tuple[int, ...]) -> tuple[RunSpec, ...]:
    # Seed-major, so a preset stopped part-way already has complete pairs: every optimizer on seed 0 first.
    return tuple(replace(r, seed=s) for s in seeds for r in runs)


# the four optimizers of the papers' central claims (CORE_CLAIMS): quick, precision, pretrain-gpu
CORE = ["adamw", "adam-mini", "sgd-sai", "alpha-adam"]
# runs that are an optimizer with arguments: label -> (optimizer, arguments, whose lr)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "alpha-adam-sync": ("alpha-adam", {"mask": "sync"}, "alpha-adam"),
    "adamw-pma-k1": ("adamw-pma", {"period": 1, "betas": (0.9, 0.999)}, "adamw"),
    # leanopt's own combinations: the memory-saving optimizers with AlphaAdam's mask
    "adam-mini-async": ("adam-mini", {"mask": "async"}, "adam-mini-async"),
    "sgd-sai-async": ("sgd-sai", {"mask": "async"}, "sgd-sai-async"),
    # compact optimizer state (leanopt.precision) at the full-precision optimizer's lr
    **{f"{n}-{prec}": (n, {"state_precision": prec}, n) for n in CORE for prec in ("int8", "bf16")},
    "adam-mini-int4": ("adam-mini", {"state_precision": "int4"}, "adam-mini"),
    # a peer's 8-bit AdamW (torchao, where installed), at AdamW's lr
    "adamw-torchao8bit": ("torchao:AdamW8bit", {}, "adamw"),
}


def _at_lr(run: RunSpec, lr: float, group: str) -> RunSpec:
    """``run`` at another ``lr``, named after it, in ``group``, with the common weight-decay
    strength (its other arguments, accumulation and seed kept)."""
    kwargs = {**run.kwargs, **({"weight_decay": DECAY / lr} if "weight_decay" in run.kwargs else {})}
    return replace(run, label=f"{group}-lr{lr:.3g}", lr=lr, kwargs=kwargs, group=group)


def _run(label: str, lr: float | None = None, group: str = "", lrs: dict[str, float] = LRS) -> RunSpec:
    """The run ``label`` (an optimizer or a :data:`VARIANTS` entry) at ``lr`` (default: its
    entry in ``lrs``), with the common weight-decay strength. A run in a ``group``, or at an
    lr other than its :data:`LRS` entry, is named after its lr (:func:`_at_lr`, grouped under
    ``label`` by default), so a horizon's own lr (:data:`PRETRAIN_LRS`) shares its folder with
    the sweep run that chose it."""
    optimizer, extra, lr_of = VARIANTS.get(label, (label, {}, label))
    default = RunSpec(label, optimizer, LRS[lr_of], {**_opt_kwargs(optimizer, LRS[lr_of]), **extra})
    lr = lrs[lr_of] if lr is None else lr
    return _at_lr(default, lr, group or label) if group or not math.isclose(lr, LRS[lr_of]) else default


def _pretrain_runs(names: list[str], lrs: dict[str, float] = LRS) -> list[RunSpec]:
    return [_run(n, lrs=lrs) for n in names]


def _pma_pair_runs(base: str, pma: str, k: int, lr: float, variants: tuple[str, ...] = ("paper",)) -> list[RunSpec]:
    """The accumulation baseline (one step per K micro-batches) and PMA (a step per
    micro-batch, period K) on the same micro-batches."""
    betas = (0.9, 0.95) if base == "adamw" else (0.95, 0.98)  # the PMA paper's, for both sides
    wd = {"weight_decay": DECAY / lr}
    runs = [RunSpec(f"{base}-accum{k}", base, lr, {**wd, "betas": betas}, accum=k)]
    for v in variants:
        suffix = "" if v == "paper" else "-released"
        runs.append(RunSpec(f"{pma}{k}{suffix}", pma, lr, {**wd, "betas": betas, "period": k, "variant": v}))
    return runs


def _robustness_runs() -> list[RunSpec]:
    """lr × {1/9 … 9} around each optimizer's preset lr, weight decay × {0, 1, 10} around
    the common strength (``DECAY / lr`` at the preset lr). SGD's is torch's coupled L2
    (added to the gradient), which its momentum of 0.9 amplifies about tenfold."""
    runs = []
    for n in ("sgd-sai", "adamw", "sgd", "adam-mini"):
        base_wd = DECAY / LRS[n]
        for f in (1 / 9, 1 / 3, 1.0, 3.0, 9.0):
            for w in (0.0, 1.0, 10.0):
                runs.append(RunSpec(f"{n}-lr{f:.3g}-wd{w:g}", n, LRS[n] * f, {"weight_decay": base_wd * w}, group=n))
    return runs


def _sweep_runs(centers: dict[str, float], factors: tuple[float, ...]) -> list[RunSpec]:
    return [_run(n, centers[n] * f, group=n) for n in centers for f in factors]


def _horizon_sweep_runs(names: list[str], lrs: dict[str, float]) -> tuple[RunSpec, ...]:
    """A sweep at a preset's own horizon: each of ``names`` at lr x 1/2, 1, 2 around ``lrs``. The
    run at lr x 1 has the name the preset's run at that lr has, so they share a folder (trained once)."""
    return tuple(r for n in names for r in (_run(n, lrs[n] / 2, group=n), _run(n, lrs=lrs), _run(n, lrs[n] * 2, group=n)))


SWEEP_MAX_RUNS = 9  # lrs per optimizer at most, edge extensions included


def sweep_extension(runs: list[RunSpec], summaries: list[dict[str, Any]]) -> list[RunSpec]:
    """The next runs of a sweep: for each optimizer whose best lr lies at an edge of its
    grid, the lr one factor of two beyond it (until the winner is inside the grid)."""
    extra = []
    by_group: dict[str, list[tuple[RunSpec, dict]]] = {}
    for r, s in zip(runs, summaries):
        by_group.setdefault(r.group_name, []).append((r, s))
    for group, pairs in by_group.items():
        pairs.sort(key=lambda p: p[0].lr)
        finite = [p for p in pairs if math.isfinite(p[1]["final_val"])]
        if not finite or len(pairs) >= SWEEP_MAX_RUNS:
            continue
        best = min(finite, key=lambda p: p[1]["final_val"])[0]
        if best is pairs[0][0]:
            lr = best.lr / 2
        elif best is pairs[-1][0]:
            lr = best.lr * 2
        else:
            continue
        extra.append(_at_lr(best, lr, group))
    return extra


def _base(train: TrainConfig, lr: float) -> tuple[TrainConfig, RunSpec]:
    return train, RunSpec("base-adamw", "adamw", lr, {"weight_decay": DECAY / lr})


def _finetune_task(name: str, model: ModelSpec, base_micro: int, micro: int, batch: int, seq: int, device: str = "cpu",
                   bf16: bool = False, minutes: float = 0.0, moves: dict[str, float] | None = None) -> TaskSpec:
    """``moves``: :data:`FINETUNE_LR_MOVES` where this preset's horizon was swept."""
    base_train = TrainConfig("python", model, seq_len=seq, micro_batch=16 if device == "cpu" else 32, micro_steps=base_micro,
                             eval_every=base_micro // 10, device=device, bf16=bf16)
    # eval_every: 25 validations, a multiple of both K
    ft = TrainConfig("shakespeare", model, seq_len=seq, micro_batch=batch, micro_steps=micro, eval_every=micro // 25,
                     eval_batches=16,
                     warmup_frac=0.0, device=device, bf16=bf16, init_from="base")
    runs = []
    for k in (4, 8):
        for base in ("adamw", "lion"):
            move = (moves or {}).get(f"{base}-accum{k}", 1.0)
            pair = _pma_pair_runs(base, f"{base}-pma", k, LRS[base] * FINETUNE_LR_FACTOR * move, ("paper", "released"))
            # a moved lr names the runs after it: the baseline's is then the sweep's run (same folder)
            runs += pair if move == 1.0 else [_at_lr(r, r.lr, r.label) for r in pair]
    return TaskSpec(name, "PMA's claim: fine-tune a model pre-trained on Python code on Shakespeare; K-step accumulation "
                    f"against PMA with period K, same micro-batches ({micro // 8} optimizer steps at K = 8)", ft,
                    _seeded(runs, (0, 1)), ("pma-speedup",), base=_base(base_train, LRS["adamw"]), kind="finetune",
                    minutes=minutes)


PRESETS: dict[str, TaskSpec] = {}


def _add(task: TaskSpec) -> None:
    PRESETS[task.name] = task


# the claims on AdamW, Adam-mini, SGD-SaI and AlphaAdam alone (the presets that run those four)
CORE_CLAIMS = ("adam-mini-loss", "adam-mini-memory", "sgd-sai-loss", "sgd-sai-memory", "sgd-sai-speed", "alpha-adam-early")
PRETRAIN = ["adamw", "adam-mini", "sgd-sai", "alpha-adam", "alpha-adam-sync", "cadamw", "lion", "adamw-pma-k1",
            "adam-mini-async", "sgd-sai-async"]
PRETRAIN_CLAIMS = CORE_CLAIMS + ("alpha-adam-async", "pma-k1", "adam-mini-async", "sgd-sai-async")
# 1 200 optimizer steps of 16 x 128 = 2 048 tokens (2.5 M tokens, 1.3 tokens per parameter), 30 validations
PRETRAIN_TRAIN = TrainConfig("python", DEMO_MODEL, seq_len=128, micro_batch=16, micro_steps=1200, eval_every=40, eval_batches=8)

_add(TaskSpec(
    "smoke", "a seconds-long run of every code path, for the tests",
    TrainConfig("python", SMOKE_MODEL, seq_len=32, micro_batch=4, micro_steps=16, eval_every=4, eval_batches=2),
    _seeded(_pretrain_runs(["adamw"]), (0, 1)) + tuple(_pretrain_runs(["adam-mini", "sgd-sai", "alpha-adam", "adamw-pma-k1"]))
    + tuple(_pma_pair_runs("adamw", "adamw-pma", 2, LRS["adamw"])),
    CORE_CLAIMS + ("pma-k1", "pma-speedup"), scale_models=("tiny",),
))
QUICK_TRAIN = TrainConfig("python", QUICK_MODEL, seq_len=128, micro_batch=16, micro_steps=240, eval_every=12, eval_batches=8)
_add(TaskSpec(
    "quick", "what `./run demo` runs: AdamW, Adam-mini, SGD-SaI and AlphaAdam, 2 seeds each (paired), on Python "
    "source, a 1.1M-parameter GPT, 240 steps (PMA's claims: the pretrain and finetune presets)",
    QUICK_TRAIN, _seeded(_pretrain_runs(CORE), (0, 1)), CORE_CLAIMS, minutes=7,  # 8 runs, ~50 s each
))
_add(TaskSpec(
    "sweep-quick", "the learning-rate sweep at quick's own horizon (240 steps): its optimizers at their lr x 1/2, 1, 2, "
    "one seed, extended by factors of two until the winner is inside the grid (the run at quick's lr is quick's seed 0)",
    QUICK_TRAIN, _horizon_sweep_runs(CORE, LRS), (), kind="sweep", minutes=7, runs_from="quick",  # 8 runs of its own
))
_add(TaskSpec(
    "pretrain", "pre-training on Python source, 1 200 steps of 2 048 tokens: AdamW, Adam-mini, SGD-SaI, AlphaAdam (async "
    "and sync mask), C-AdamW, Lion, AdamW-PMA with K=1, and Adam-mini and SGD-SaI with the asynchronous mask; 3 seeds each, "
    "the 1.8M-parameter demo GPT",
    PRETRAIN_TRAIN, _seeded(_pretrain_runs(PRETRAIN, PRETRAIN_LRS), (0, 1, 2)), PRETRAIN_CLAIMS, minutes=270,  # 9 min a run
))
_add(TaskSpec(
    "precision", "compact optimizer state against full precision: AdamW, Adam-mini, SGD-SaI and AlphaAdam with int8 and "
    "bf16 state, Adam-mini with int4 momenta, beside their full-precision selves (and torchao's AdamW8bit where installed); "
    "pretrain's model, data and horizon, "
    "3 seeds (the full-precision runs are pretrain's own: run folders shared, trained once)",
    PRETRAIN_TRAIN,
    _seeded(_pretrain_runs([v for n in CORE for v in (n, f"{n}-int8", f"{n}-bf16")] + ["adam-mini-int4"]
                           + (["adamw-torchao8bit"] if importlib.util.find_spec("torchao") else []), PRETRAIN_LRS), (0, 1, 2)),
    ("state-precision",), minutes=380, runs_from="pretrain",  # 30 runs of its own and pretrain's 12, ~9 min each
))
PRETRAIN_LONG_TRAIN = PRETRAIN_TRAIN.with_(micro_steps=6000, eval_every=200)
LONG = ["adamw", "adam-mini", "alpha-adam", "sgd-sai"]
_add(TaskSpec(
    "pretrain-long", "pretrain's model and data for 5x the tokens (6 000 steps, 12.3 M tokens): AdamW, Adam-mini, "
    "AlphaAdam and SGD-SaI, 2 seeds, to see whether each gap to AdamW shrinks or grows with training length",
    PRETRAIN_LONG_TRAIN,
    _seeded(_pretrain_runs(LONG, LONG_LRS), (0, 1)),
    ("adam-mini-loss", "sgd-sai-loss", "alpha-adam-early"), minutes=300,  # 8 runs of 5x pretrain's, ~35 min each
    shorter="pretrain",
))
_add(TaskSpec(
    "sweep-pretrain", "the learning-rate sweep at pretrain's own horizon: each optimizer at its preset lr x 1/2, 1, 2, "
    "one seed, extended by factors of two until the winner is inside the grid (the run at pretrain's lr is pretrain's seed 0)",
    PRETRAIN_TRAIN,
    _horizon_sweep_runs([n for n in PRETRAIN if n in LRS], LRS),
    (), kind="sweep", minutes=215, runs_from="pretrain",  # 24 runs (8 of them pretrain's), 9 min each
))
_add(TaskSpec(
    "sweep-long", "does the optimum move with 5x the tokens? pretrain-long's optimizers at pretrain's lr x 1/2, 1, 2 "
    "at its horizon, one seed, extended by factors of two until the winner is inside the grid (the run at the lr "
    "pretrain-long takes is its seed 0)",
    PRETRAIN_LONG_TRAIN,
    _horizon_sweep_runs(LONG, PRETRAIN_LRS),
    (), kind="sweep", minutes=300, runs_from="pretrain-long",  # 8 runs of its own, ~35 min each
))
_FINETUNE_SHAPE = dict(model=DEMO_MODEL, base_micro=1200, micro=1600, batch=8, seq=128)
_add(_finetune_task("finetune", **_FINETUNE_SHAPE, minutes=90, moves=FINETUNE_LR_MOVES))  # 24 runs, ~3.5 min
_FINETUNE_DEFAULT = _finetune_task("finetune", **_FINETUNE_SHAPE)  # its lrs before sweep-finetune moved them
_add(replace(
    PRESETS["finetune"], name="sweep-finetune",
    description="the learning-rate sweep at finetune's own horizon: the accumulation baselines (AdamW and Lion, K = 4 and 8; "
    "PMA takes its baseline's lr) at finetune's lr x 1/2, 1, 2, one seed, extended by factors of two until the winner is "
    "inside the grid (the run at finetune's lr is finetune's seed 0)",
    # lr x 1 is the default lr's seed-0 run, finetune's own where its lr did not move (same name: trained once)
    runs=tuple(r if f == 1 else _at_lr(r, r.lr * f, r.label) for r in _FINETUNE_DEFAULT.runs if r.accum > 1 and r.seed == 0
               for f in (0.5, 1, 2)),
    claims=(), kind="sweep", minutes=45, runs_from="finetune",  # 12 runs (4 of them finetune's), ~3.5 min each
))
_add(TaskSpec(
    "robustness", "SGD-SaI's claim: a learning-rate x weight-decay grid (lr x 1/9..9, weight decay x 0, 1, 10) for SGD-SaI, "
    "AdamW, SGD-momentum and Adam-mini on a short pre-training",
    TrainConfig("python", QUICK_MODEL, seq_len=128, micro_batch=16, micro_steps=100, eval_every=20, eval_batches=8),
    tuple(_robustness_runs()), ("sgd-sai-robust",), kind="robustness", minutes=20,  # 60 runs of 100 steps
))
_add(TaskSpec(
    "sweep", "the learning-rate sweep behind every preset's lr: each optimizer at lr x 1/4..4 around its family "
    "default, 100 steps of the quick pre-training; the best final val loss wins unless the default is within 1% of it",
    TrainConfig("python", QUICK_MODEL, seq_len=128, micro_batch=16, micro_steps=100, eval_every=20, eval_batches=8),
    tuple(_sweep_runs(SWEEP_CENTER, SWEEP_FACTORS)), (), kind="sweep",
))
# per sweep: the lrs its grid is centred on, and the table it chooses (its report sets both beside the winner)
SWEEP_TABLES: dict[str, tuple[dict[str, float], dict[str, float]]] = {
    "sweep": (SWEEP_CENTER, LRS),
    "sweep-quick": ({n: LRS[n] for n in CORE}, {r.group_name: r.lr for r in PRESETS["quick"].runs}),
    "sweep-pretrain": (LRS, PRETRAIN_LRS),
    "sweep-long": ({n: PRETRAIN_LRS[n] for n in LONG}, {n: LONG_LRS[n] for n in LONG}),
    "sweep-finetune": ({r.label: r.lr for r in _FINETUNE_DEFAULT.runs if r.accum > 1},
                       {r.group_name: r.lr for r in PRESETS["finetune"].runs if r.accum > 1}),
}
# Sized for one GPU in well under 10 minutes (scripts/gpu-check runs it): 8 runs of 400 micro-batches of
# 16 x 512 tokens, the GPT-2-small shape at the corpus's 4 096-token vocabulary (91M parameters, ~4.5e12
# FLOPs a step). Estimated, not yet measured: no GPU has run it. The lrs are the small model's (LRS), not
# tuned at this size. A checkpoint (model and state, ~1 GB) every 200 micro-batches, not at every validation.
_add(TaskSpec(
    "pretrain-gpu", "pre-training on a GPU: the GPT-2-small shape (91M parameters with the corpus's 4 096-token "
    "vocabulary), bf16 autocast, seq 512, 400 micro-batches of 8 192 tokens; AdamW, Adam-mini, SGD-SaI and AlphaAdam, "
    "2 seeds each (paired), their default (compiled) path",
    TrainConfig("python", GPU_MODEL, seq_len=512, micro_batch=16, micro_steps=400, eval_every=20, eval_batches=8,
                bf16=True, device="cuda", checkpoint_every=200),
    _seeded(_pretrain_runs(CORE), (0, 1)), CORE_CLAIMS,
))
_add(_finetune_task("finetune-gpu", GPU_MODEL, base_micro=2000, micro=1600, batch=16, seq=512, device="cuda", bf16=True))


def get_task(
    name: str,
    *,
    device: str | None = None,
    corpus: str | None = None,
    hf_config: str | None = None,
    bf16: bool | None = None,
    seeds: tuple[int, ...] | None = None,
) -> TaskSpec:
    """A preset, with the command line's overrides applied (to its base pre-training too)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    task = PRESETS[name]

    def adjust(train: TrainConfig, is_base: bool) -> TrainConfig:
        changes: dict[str, Any] = {}
        if device is not None:
            changes["device"] = device
        if bf16 is not None:
            changes["bf16"] = bf16
        if hf_config is not None:
            changes["model"] = ModelSpec(hf_config=hf_config)
        if corpus is not None and not is_base:
            changes["corpus"] = corpus
        return replace(train, **changes)

    runs = task.runs
    if seeds is not None:
        if not seeds:
            raise ConfigError("--seeds needs at least one seed")
        firsts = {r.label: r for r in task.runs}
        runs = _seeded(list(firsts.values()), seeds)
    base = (adjust(task.base[0], True), task.base[1]) if task.base else None
    # the estimate is the preset's, for its own runs: other seeds, more or fewer runs (roughly:
    # a base pre-training or another preset's runs it counts do not scale with them)
    minutes = task.minutes * len(runs) / len(task.runs) if task.runs else task.minutes
    return replace(task, train=adjust(task.train, False), runs=runs, base=base, minutes=minutes)


def shorter_runs(out_dir: str | Path, task: TaskSpec) -> dict[str, Any]:
    """The finished runs of ``task.shorter`` that are ``task``'s runs at that preset's length
    (the same group, optimizer, arguments and seed, so the same init and data order; the lr is
    each preset's own, which its sweep may have moved), as the report compares them: group,
    seed, lr, final validation loss, tokens. The shorter preset's configuration is ``task``'s
    own, with this invocation's overrides (device, corpus, model, bf16), in all but the fields
    in which the two presets differ."""
    mine, other = PRESETS[task.name], PRESETS[task.shorter]
    differ = {f.name: getattr(other.train, f.name) for f in fields(other.train)
              if getattr(other.train, f.name) != getattr(mine.train, f.name)}
    train = replace(task.train, **differ)
    by_group = {r.group_name: r for r in other.runs}
    runs = []
    for run in task.runs:
        theirs = by_group.get(run.group_name)
        if theirs is None or _but_lr(theirs) != _but_lr(run):
            continue
        theirs = replace(theirs, seed=run.seed)
        done = finished(_run_dir(out_dir, other, theirs), train, theirs)
        if done is not None:
            runs.append({"lr": theirs.lr, **{k: done[k] for k in ("group", "seed", "final_val", "tokens")}})
    return {"task": other.name, "tokens": train.micro_steps * train.micro_batch * train.seq_len, "runs": runs}


def _but_lr(run: RunSpec) -> tuple:
    """What makes a run apart from its lr and seed. Weight decay follows the lr (``DECAY / lr``),
    so its strength ``lr·wd`` stands for it."""
    kwargs = {k: float(f"{run.lr * v:.6g}") if k == "weight_decay" else v for k, v in run.kwargs.items()}
    return run.optimizer, run.accum, tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


def scale_runs(task: TaskSpec) -> list[tuple[str, str, dict[str, Any]]]:
    """One ``(group, optimizer, arguments)`` per group of ``task``'s runs, as the report's
    rows are keyed, for :func:`state_at_scale` (peers' optimizers cannot be built on meta)."""
    firsts = {r.group_name: r for r in task.runs if not r.optimizer.startswith(PEER_PREFIX)}
    return [(name, r.optimizer, r.kwargs) for name, r in firsts.items()]


def environment(device: str) -> dict[str, Any]:
    import numpy

    env = {
        "leanopt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _run_dir(out_dir: str | Path, task: TaskSpec, run: RunSpec) -> Path:
    return Path(out_dir) / (task.runs_from or task.name) / "runs" / run.key


def _duration(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def finished_so_far(task: TaskSpec, out_dir: str | Path) -> tuple[list[dict[str, Any]], list[RunSpec]]:
    """The summaries of ``task``'s finished runs and the runs not finished; a sweep's edge
    extensions count where the grid they extend is finished (else they are not yet known)."""
    done: dict[str, tuple[RunSpec, dict[str, Any]]] = {}
    unfinished: list[RunSpec] = []
    pending = list(task.runs)
    while pending:
        for run in pending:
            s = finished(_run_dir(out_dir, task, run), task.train, run)
            if s is None:
                unfinished.append(run)
            else:
                done[run.key] = (run, s)
        pending = []
        if task.kind == "sweep":
            open_groups = {r.group_name for r in unfinished}
            closed = [(r, s) for r, s in done.values() if r.group_name not in open_groups]
            if closed:
                pending = [r for r in sweep_extension(*map(list, zip(*closed))) if r.key not in done]
    return [s for _, s in done.values()], unfinished


def run_task(
    task: TaskSpec,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    progress: bool = True,
    log=print,
    stop_after: int | None = None,
    dp: DataParallel = DataParallel(),
    overwrite: bool = False,
    so_far: bool = False,
) -> Path:
    """Run every run of ``task`` (finished runs are kept, interrupted ones resume), then
    write ``summary.json`` and the report. All checks happen before any training. A run
    folder of another configuration is refused, or with ``overwrite`` moved aside.
    ``dp``: this rank of a data-parallel run; rank 0 writes and logs. ``so_far``: train
    nothing; an interim report of the runs finished so far, naming the others."""
    from .report import write_report

    task.validate()
    if so_far and not dp.is_main:
        return Path(out_dir) / task.name / "report.md"
    dp.check(task.train.micro_batch)
    if task.base is not None:
        dp.check(task.base[0].micro_batch)
    if not dp.is_main:
        progress, log = False, lambda *a, **k: None
    if task.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"preset {task.name!r} runs on {task.train.device}, but torch sees no CUDA device")
    corpus = load_corpus(data_dir, task.train.corpus)
    base_corpus = load_corpus(data_dir, task.base[0].corpus) if task.base else None
    if base_corpus is not None and base_corpus.meta["tokenizer_sha256"] != corpus.meta["tokenizer_sha256"]:
        raise DataError(f"corpora {base_corpus.name!r} and {corpus.name!r} were tokenized differently; run `leanopt prepare --force`")
    task_dir = Path(out_dir) / task.name
    task_dir.mkdir(parents=True, exist_ok=True)
    if dp.is_main:
        remove_stale_temporaries(task_dir)
    t0 = time.perf_counter()

    init_state = None
    if task.base is not None and not so_far:
        base_train, base_run = task.base
        log(f"[{task.name}] pre-training the base model on {base_corpus.name!r} (cached after the first time)")
        cache = Path(out_dir) / "_base" / f"{task.runs_from or task.name}-{base_run.key}"  # (a sweep shares its preset's)
        train_run(cache, base_train, base_run, base_corpus, save_model=True, progress=progress, dp=dp, overwrite=overwrite,
                  log=log)
        init_state = torch.load(cache / "model.pt", weights_only=True)

    runs, summaries = list(task.runs), []
    unfinished: list[RunSpec] = []
    if so_far:
        summaries, unfinished = finished_so_far(task, out_dir)
        if not summaries:
            raise ConfigError(f"no run of {task.name!r} has finished in {task_dir} yet: nothing to report")
        runs = []  # nothing to train
        log(f"[{task.name}] interim report: {len(summaries)} runs finished, {len(unfinished)} not")
    elif task.minutes:
        left = sum(finished(_run_dir(out_dir, task, run), task.train, run) is None for run in runs)
        already = (f", {len(runs) - left} already finished: about {_duration(task.minutes * left / len(runs))} left"
                   if left < len(runs) else "")
        log(f"[{task.name}] {len(runs)} runs, about {_duration(task.minutes)} on 2 CPU cores{already} "
            "(finished runs are kept: an interrupted invocation resumes where it stopped)")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc=f"{task.name}", unit="run", dynamic_ncols=True)
    while len(summaries) < len(runs):
        for run in runs[len(summaries):]:
            summaries.append(train_run(_run_dir(out_dir, task, run), task.train, run, corpus, init_state=init_state,
                                       progress=progress, stop_after=stop_after, dp=dp, overwrite=overwrite, log=log))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(last=f"{run.key} {summaries[-1]['final_val']:.3f}", refresh=False)
        if task.kind == "sweep":  # a winner at an edge of its grid: one more lr beyond it
            extra = sweep_extension(runs, summaries)
            runs += extra
            if bar is not None:
                bar.total += len(extra)
    if bar is not None:
        bar.close()
    summary = {
        "task": task.name,
        "description": task.description,
        "kind": task.kind,
        "claims": list(task.claims),
        "train": asdict(task.train),
        "corpus": corpus.meta,
        "base": (asdict(task.base[0]) | {"run": asdict(task.base[1])}) if task.base else None,
        "environment": environment(task.train.device) | {"world_size": dp.world, "parallel": dp.mode},
        "runs": summaries,
        "wall_s": time.perf_counter() - t0,
    }
    if so_far:
        summary["unfinished"] = [{"key": r.key, "group": r.group_name, "lr": r.lr, "seed": r.seed} for r in unfinished]
    if task.shorter and dp.is_main:
        summary["shorter"] = shorter_runs(out_dir, task)
    if task.kind in ("pretrain", "finetune") and dp.is_main:
        summary["memory_at_scale"] = state_at_scale(scale_runs(task), task.scale_models)
    if not dp.is_main:
        return task_dir / "report.md"
    write_json(task_dir / "summary.json", summary)
    report = write_report(task_dir)
    log(f"[{task.name}] report: {report}")
    return report
