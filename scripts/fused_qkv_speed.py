"""Adam-mini's step on fused QKV weights (torch's nn.MultiheadAttention ``in_proj_weight``:
query and key heads, then value neurons, so blocks of unequal size) by the C kernel over
each run of equal blocks, against the eager path those weights took before:

    .venv/bin/python scripts/fused_qkv_speed.py

Four ``nn.TransformerEncoderLayer(768, 12 heads, 3072)`` (28M parameters, 7M of them fused
QKV), float32, 2 threads; both arms step in turn in one process, 7 rounds after a warm-up,
medians and the ratio to the C kernel."""

from __future__ import annotations

import dataclasses
import importlib
import statistics
import time
import warnings

import torch

import leanopt

am = importlib.import_module("leanopt.adam_mini")  # (leanopt.adam_mini is also the functional core's name)


def arm(runs_in_c: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True) for _ in range(4)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = leanopt.AdamMini(model, lr=1e-3)
    takes = am.BACKENDS.native_takes
    before = dataclasses.replace(am.BACKENDS, native_takes=lambda row, o: am._kind(row[4]) != "rows" and takes(row, o))

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
    arms = {"C kernel, runs of equal blocks": arm(True), "eager (before)": arm(False)}
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
