"""The ``leanopt`` command line.

* ``leanopt list`` — every registered optimizer with its paper and its optimizer-state
  size, measured by one real step on the built-in demo GPT.
* ``leanopt partition [--demo | --hf-config PATH]`` — Adam-mini's partition table and the
  optimizer-state memory of Adam-mini against AdamW, for the demo GPT or for a
  transformers model built from a config JSON on the ``meta`` device (no weights are
  loaded or allocated, nothing is downloaded).
* ``leanopt prepare`` — the benchmark corpora and tokenizer (:mod:`leanopt.bench.data`).
* ``leanopt bench PRESET`` — train and compare optimizers, write a report with the
  papers' claims checked (:mod:`leanopt.bench.tasks`); data-parallel under
  ``torchrun --nproc_per_node=N -m leanopt bench PRESET [--parallel ddp|fsdp|tp|fsdp+tp]``.
* ``leanopt report RUN_DIR`` — regenerate a report from saved results.
* ``leanopt speed`` — optimizer-step time against the memory-bandwidth floor
  (:mod:`leanopt.bench.speed`).

A user error (bad option, missing or corrupt data, a folder that cannot be written, a
full disk, Ctrl-C) prints one line, with a hint where one helps, and exits non-zero;
``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import argparse
import inspect
import errno
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .adam_mini import AdamMini
from .models import PRESETS, build_model
from .models.hf import HFConfigError, build_hf_model
from .partition import format_partition
from .bench.parallel import MODES as PARALLEL_MODES
from .registry import create_optimizer, list_optimizers, optimizer_info, state_bytes

__all__ = ["main", "measure_state_ratio"]


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def measure_state_ratio(name: str, model: nn.Module) -> float:
    """Optimizer-state bytes per parameter byte after one step with random gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(name, model)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3
    opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return state_bytes(opt) / param_bytes


def cmd_list(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model = build_model(args.model)
    n = model.num_parameters()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"optimizer state measured after one step on the '{args.model}' GPT ({n:,} parameters, float32)")
    print(f"{'name':<11} {'state/params':>12}  {'state per parameter':<28} paper")
    for name in list_optimizers():
        info = optimizer_info(name)
        model.load_state_dict(snapshot)
        try:
            ratio = f"{measure_state_ratio(name, model):.3f}x"
        except RuntimeError as e:  # e.g. an optimizer this torch lacks
            ratio = "n/a"
            print(f"  ({name}: {e})", file=sys.stderr)
        print(f"{name:<11} {ratio:>12}  {info.state:<28} {info.paper}")
    if args.precisions:
        _list_precisions()
    else:
        print("\n(leanopt list --precisions adds the bytes per parameter of every state_precision, GPT-2-small shapes)")
    return 0


def _list_precisions() -> None:
    """Bytes of state per parameter at every ``state_precision``, measured on a
    GPT-2-small-shaped model on the meta device (shapes only: no weights, a second or two)."""
    from .bench.memory import state_at_scale
    from .precision import PRECISIONS

    names = [n for n in list_optimizers() if "state_precision" in inspect.signature(optimizer_info(n).factory).parameters]
    runs = [(f"{n}/{prec}", n, {"state_precision": prec}) for n in names for prec in PRECISIONS]
    row = state_at_scale(runs, models=("gpt2-124m",))["gpt2-124m"]
    n_params = row["n_params"]
    print(f"\nbytes of optimizer state per parameter by state_precision, measured on GPT-2-small shapes "
          f"({n_params / 1e6:.0f}M float32 parameters, meta device; int4: momenta int4, second moments int8; "
          f"tensors under 4096 elements stay float32)")
    print(f"{'name':<11} " + " ".join(f"{prec:>7}" for prec in PRECISIONS))
    for n in names:
        print(f"{n:<11} " + " ".join(f"{row['state_bytes'][f'{n}/{prec}'] / n_params:>7.3f}" for prec in PRECISIONS))


def cmd_partition(args: argparse.Namespace) -> int:
    if args.hf_config:
        model = build_hf_model(args.hf_config)
        title = f"transformers model from {args.hf_config} ({type(model).__name__}, meta device)"
    else:
        with torch.device("meta"):
            model = build_model(args.preset)
        title = f"built-in demo GPT, preset '{args.preset}' (meta device)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = AdamMini(model, value_blocks=args.value_blocks)
    rows = opt.describe_partition()
    bytes_per_element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"Adam-mini partition of the {title}")
    print()
    print(format_partition(rows, bytes_per_element=bytes_per_element, detail=not args.summary))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .bench.data import DEFAULT_CORPORA, prepare

    corpora = args.corpus if args.corpus is not None else (() if args.text else DEFAULT_CORPORA)
    prepare(args.data_dir, corpora, texts=args.text or (), text_name=args.name, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, force=args.force, tokenizer_from=args.tokenizer_from)
    return 0


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes integers separated by commas, got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.parallel import init_data_parallel
    from .bench.tasks import get_task, run_task

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.preset, device=args.device, corpus=args.corpus, hf_config=args.hf_config,
                    bf16=True if args.bf16 else None, seeds=args.seeds)
    task.validate()  # before joining a process group: a bad option fails fast on every rank
    dp = init_data_parallel(args.parallel, task.train.device)
    if args.parallel and not dp.active:
        print(f"leanopt: --parallel {args.parallel} without torchrun (WORLD_SIZE unset or 1): one process", file=sys.stderr)
    try:
        # progress bars only for a person watching: not in logs, pipes or CI
        report = run_task(task, args.out, args.data_dir, progress=not args.no_progress and sys.stderr.isatty(), dp=dp,
                          overwrite=args.overwrite, so_far=args.so_far)
    finally:
        if dp.active:
            torch.distributed.destroy_process_group()
    if dp.is_main:
        text = Path(report).read_text()
        if "## Claims" in text:  # the verdicts, on the terminal: the rest is in the report
            print(text[text.index("## Claims"):text.index("## Results")].rstrip() + "\n")
        print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .bench.report import write_report

    try:
        print(f"report: {write_report(args.run_dir)}")
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:  # a summary.json that leanopt did not write
        raise CLIError(f"{Path(args.run_dir) / 'summary.json'} is not a leanopt task summary ({type(e).__name__}: {e}); "
                       "rerun `leanopt bench PRESET` to rebuild it") from None
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanopt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the optimizers with their measured state size")
    p.add_argument("--model", default="demo", choices=list(PRESETS), help="GPT preset to measure on (default: demo)")
    p.add_argument("--precisions", action="store_true",
                   help="also measure the state bytes per parameter of every state_precision on GPT-2-small shapes (~10 s)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("partition", help="print Adam-mini's partition and its state memory against AdamW")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="the built-in demo GPT (default)")
    src.add_argument("--hf-config", metavar="PATH", help="a transformers config.json (or a folder holding one)")
    p.add_argument("--preset", default="demo", choices=list(PRESETS), help="GPT preset for --demo (default: demo)")
    p.add_argument("--value-blocks", default="neuron", choices=["neuron", "whole"], help="value projection blocks")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="bytes per element for the memory figures")
    p.add_argument("--summary", action="store_true", help="print only the per-rule summary, not every parameter")
    p.set_defaults(func=cmd_partition)

    from .bench.data import DEFAULT_CORPORA
    from .bench.tasks import PRESETS as TASKS

    p = sub.add_parser("prepare", help="download and tokenize the benchmark corpora")
    p.add_argument("--data-dir", default=None, help="where data is cached (default: $LEANOPT_DATA or ./data)")
    p.add_argument("--corpus", nargs="*", default=None, metavar="NAME", help="built-in corpora to prepare (default: python shakespeare)")
    p.add_argument("--text", nargs="+", metavar="PATH", help="your own text files or folders, prepared as corpus --name")
    p.add_argument("--name", default="text", help="corpus name for --text (default: text)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096)")
    p.add_argument("--tokenizer-from", nargs="+", default=list(DEFAULT_CORPORA), metavar="NAME",
                   help="corpora the tokenizer is trained on (default: python shakespeare)")
    p.add_argument("--val-fraction", type=float, default=0.03, help="share of documents held out for validation")
    p.add_argument("--force", action="store_true", help="rebuild the tokenizer and every corpus")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("bench", help="run a benchmark preset and write its report")
    p.add_argument("preset", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--data-dir", default=None, help="prepared data (default: $LEANOPT_DATA or ./data)")
    p.add_argument("--out", default="runs", help="results folder (default: ./runs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    p.add_argument("--corpus", default=None, help="train on this prepared corpus instead of the preset's")
    p.add_argument("--hf-config", default=None, metavar="PATH", help="train a transformers model built from this config")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds for every run (default: the preset's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when stderr is not a terminal)")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun runs whose folder holds another configuration, moving the old folder aside (never deleted)")
    p.add_argument("--so-far", action="store_true",
                   help="train nothing: an interim report of the runs finished so far, naming the others")
    p.add_argument("--parallel", choices=list(PARALLEL_MODES), default=None,
                   help="under torchrun: DistributedDataParallel (default), FSDP2 sharding, tensor parallelism, or "
                        "FSDP2 x TP (TP over pairs of ranks); each data-parallel rank reads its slice of every micro-batch")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("speed", help="optimizer-step time against the memory-bandwidth floor (leanopt speed --help)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("report", help="regenerate the report of a finished benchmark task")
    p.add_argument("run_dir", help="a task folder, e.g. runs/quick")
    p.set_defaults(func=cmd_report)
    return parser


def _os_error_line(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    hint = {errno.ENOSPC: "the disk is full; free space and rerun the same command to resume",
            errno.EDQUOT: "the disk quota is exceeded; free space and rerun the same command to resume",
            errno.EROFS: "the file system is read-only; choose another --out",
            errno.EACCES: "permission denied; choose a folder you can write (--out, --data-dir)",
            errno.EPERM: "permission denied; choose a folder you can write (--out, --data-dir)"}.get(e.errno)
    return f"{e.strerror or e}{where}" + (f" ({hint})" if hint else "")


def main(argv: list[str] | None = None) -> int:
    """The ``leanopt`` command. User errors print one line and exit non-zero; ``--debug``
    (anywhere on the command line) shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from .bench.config import ConfigError
    from .bench.data import DataError

    try:
        if argv[:1] == ["speed"]:  # its own parser (argparse cannot pass options through a subcommand)
            from .bench.speed import main as speed_main

            return speed_main(argv[1:])
        args = make_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nleanopt: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (CLIError, ConfigError, DataError, HFConfigError) as e:
        if debug:
            raise
        print(f"leanopt: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        print(f"leanopt: error: {_os_error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
