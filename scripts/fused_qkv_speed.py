"""Adam-mini's step on fused QKV weights (torch's nn.MultiheadAttention ``in_proj_weight``:
query and key heads, then value neurons, so blocks of unequal size) by the C kernel over
each run of equal blocks, against the eager path those weights took before:

    .venv/bin/python scripts/fused_qkv_speed.py [int8|int4|bf16]

Four ``nn.TransformerEncoderLayer(768, 12 heads, 3072)`` (28M parameters, 7M of them fused
QKV), float32, 2 threads; both arms step in turn in one process, 7 rounds after a warm-up,
medians and the ratio to the C kernel. With a state precision: the compact momentum's
one-pass C step against the decode -> step -> encode path those weights took before."""

from __future__ import annotations

import dataclasses
import importlib
import statistics
import sys
import time
import warnings

import torch

import leanopt

am = importlib.import_module("leanopt.adam_mini")  # (leanopt.adam_mini is also the functional core's name)


def arm(runs_in_c: bool, precision: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True) for _ in range(4)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = leanopt.AdamMini(model, lr=1e-3, state_precision=precision)
    takes, compact_takes = am.BACKENDS.native_takes, am.BACKENDS.compact_takes
    before = dataclasses.replace(am.BACKENDS, native_takes=lambda row, o: am._kind(row[4]) != "rows" and takes(row, o),
                                 compact_takes=lambda row, o: am._kind(row[4]) != "rows" and compact_takes(row, o))

    def step() -> tuple[float, dict[str, int]]:
        saved = am.BACKENDS
        am.BACKENDS = saved if runs_in_c else before
        try:
            start = time.perf_counter()
            opt.step()
            return time.perf_counter() - start, dict(opt.last_backends)
        finally:
            am.BACKENDS = saved
    return step


def main() -> None:
    torch.set_num_threads(2)
    precision = sys.argv[1] if len(sys.argv) > 1 else "param"
    arms = {"C kernel, runs of equal blocks": arm(True, precision), "before": arm(False, precision)}
    for name, step in arms.items():
        print(f"{name}: backends {step()[1]}")
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(7):
        for k, step in arms.items():
            times[k].append(step()[0])
    base = statistics.median(times["C kernel, runs of equal blocks"])
    for k, v in times.items():
        print(f"{k}: {statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / base:.2f}x)")


if __name__ == "__main__":
    main()
