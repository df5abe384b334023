"""Compact state in the compiled kernels against decode -> compiled step -> encode, on this
machine's compiled path (the CPU stands in for CUDA with the C kernels off):

    LEANOPT_NATIVE=0 .venv/bin/python scripts/compiled_compact_speed.py

GPT-2-124M layer shapes (4096x768, 2304x768, 768x3072), fused=True, 2 threads; each arm
steps in turn in one process (7 rounds after 2 warm-up steps), medians and ratios to the
compiled compact step; "param" is the same optimizer at full precision."""

from __future__ import annotations

import dataclasses
import importlib
import statistics
import time

import torch

import leanopt

SHAPES = [(4096, 768), (2304, 768), (768, 3072)]
CASES = [("adamw", "int8", "leanopt.alpha_adam"), ("lion", "int4", "leanopt.lion"), ("adamw", "bf16", "leanopt.alpha_adam")]


def arm(name: str, precision: str, module, compiled_compact: bool):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = leanopt.create_optimizer(name, params, lr=1e-3, state_precision=precision, fused=True)
    backends = dataclasses.replace(module.BACKENDS, compiled_compact=compiled_compact)

    def step() -> float:
        saved, module.BACKENDS = module.BACKENDS, backends
        try:
            start = time.perf_counter()
            opt.step()
            return time.perf_counter() - start
        finally:
            module.BACKENDS = saved
    return step


def main() -> None:
    torch.set_num_threads(2)
    for name, precision, module_name in CASES:
        module = importlib.import_module(module_name)
        arms = {"compiled-compact": arm(name, precision, module, True), "decode-step-encode": arm(name, precision, module, False),
                "param": arm(name, "param", module, True)}
        for step in arms.values():
            step(), step()  # compile, warm up
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(7):
            for k, step in arms.items():
                times[k].append(step())
        base = statistics.median(times["compiled-compact"])
        print(f"{name} {precision}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms ({statistics.median(v) / base:.2f}x)"
                                                  for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
