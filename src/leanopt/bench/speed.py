"""``leanopt speed``: optimizer-step time against the memory-bandwidth floor.

An optimizer step is memory-bound: it must read the parameters, the gradients and the
state once and write the parameters and the state once. Its *floor* is those bytes
divided by the best bandwidth a streaming kernel reaches on the same machine, measured
in the same process. Every configuration (model, dtype, optimizer implementation) runs
in a fresh worker process, configurations are interleaved over repeats, and each
reports: step time (median and min-max over the timed steps), optimizer-state bytes per
parameter, the peak *extra* memory during a step (temporaries), and the floor.

Peak extra memory on the CPU is read from the kernel: the worker resets its peak-RSS
counter (``/proc/self/clear_refs``) right before a step and reads ``VmHWM`` after it;
glibc is told to serve large blocks with ``mmap`` so that freed temporaries leave the
resident set (otherwise RSS would keep them). On CUDA it is
``torch.cuda.max_memory_allocated`` around the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "implementations", "run_speed", "main_worker"]

# GPT-2-shaped parameter sets with Llama-style names (so Adam-mini's partition applies);
# tied embeddings as GPT-2; SwiGLU widths chosen to match GPT-2's MLP parameter count.
MODELS: dict[str, dict[str, Any]] = {
    "gpt2-30m": dict(vocab_size=32000, dim=512, n_layers=6, n_heads=8, mlp_hidden=1408, tie_embeddings=True),
    "gpt2-124m": dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, mlp_hidden=2048, tie_embeddings=True),
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_hidden=5632),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, mlp_hidden=11008),
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, mlp_hidden=192, tie_embeddings=True),
}


@dataclass(frozen=True)
class Impl:
    name: str
    family: str  # the algorithm, for grouping in the table
    build: str  # how the worker builds it (see _build)


def implementations(device: str = "cpu") -> list[Impl]:
    """Every leanopt optimizer and the peers that are installed. Each leanopt optimizer as a
    user gets it ("default": the C kernels on the CPU, the compiled ones on CUDA), as its
    eager reference (``fused=False``) and, on the CPU, with the C kernels turned off
    ("compiled": ``fused=True`` through torch.compile)."""
    impls = [
        Impl("torch AdamW (for-loop)", "AdamW", "torch-adamw-loop"),
        Impl("torch AdamW (foreach)", "AdamW", "torch-adamw-foreach"),
        Impl("torch AdamW (fused)", "AdamW", "torch-adamw-fused"),
        Impl("torch SGD-momentum (foreach)", "SGD-momentum", "torch-sgd-foreach"),
    ]
    for name, family in (("adam-mini", "Adam-mini"), ("sgd-sai", "SGD-SaI"), ("lion", "Lion"), ("alpha-adam", "AlphaAdam"),
                         ("cadamw", "C-AdamW"), ("adamw-pma", "AdamW-PMA"), ("lion-pma", "Lion-PMA")):
        impls.append(Impl(f"leanopt {name} (default)", family, f"leanopt:{name}"))
        impls.append(Impl(f"leanopt {name} (eager)", family, f"leanopt:{name}:eager"))
        if device == "cpu":
            impls.append(Impl(f"leanopt {name} (compiled)", family, f"leanopt:{name}:fused:compiled"))
    # Adam-mini with AlphaAdam's asynchronous mask (the mask component at Adam-mini's memory)
    impls.append(Impl("leanopt adam-mini+mask (default)", "Adam-mini", "leanopt:adam-mini:mask"))
    impls.append(Impl("leanopt adam-mini+mask (eager)", "Adam-mini", "leanopt:adam-mini:mask:eager"))
    # compact state (leanopt.precision), each as a user gets it by default
    for name, family in (("adamw", "AdamW"), ("adam-mini", "Adam-mini"), ("sgd-sai", "SGD-SaI"), ("lion", "Lion"),
                         ("alpha-adam", "AlphaAdam")):
        for prec in ("bf16", "int8", "int4"):
            impls.append(Impl(f"leanopt {name} ({prec} state)", family, f"leanopt:{name}:{prec}"))
    for name, family in (("adam-mini", "Adam-mini"), ("sgd-sai", "SGD-SaI"), ("lion", "Lion")):  # the mask over int8 state
        impls.append(Impl(f"leanopt {name}+mask (int8 state)", family, f"leanopt:{name}:int8:mask"))
    peers = [
        ("torchao", Impl("torchao AdamW8bit", "AdamW", "torchao:AdamW8bit")),
        ("torchao", Impl("torchao AdamW4bit", "AdamW", "torchao:AdamW4bit")),
        ("bitsandbytes", Impl("bitsandbytes AdamW8bit", "AdamW", "bnb:AdamW8bit")),
        ("adam_mini", Impl("adam-mini 1.1.1 (released)", "Adam-mini", "adam_mini")),
        ("sgd_sai", Impl("sgd-sai 1.0.3 (released)", "SGD-SaI", "sgd_sai")),
        ("lion_pytorch", Impl("lion-pytorch", "Lion", "lion_pytorch")),
        ("pytorch_optimizer", Impl("pytorch_optimizer AdamMini", "Adam-mini", "po:AdamMini")),
        ("pytorch_optimizer", Impl("pytorch_optimizer SGDSaI", "SGD-SaI", "po:SGDSaI")),
        ("pytorch_optimizer", Impl("pytorch_optimizer Lion", "Lion", "po:Lion")),
    ]
    import importlib.util

    impls += [impl for module, impl in peers if importlib.util.find_spec(module) is not None]
    return impls


# --------------------------------------------------------------------------------------
# the worker (one configuration, one process)
# --------------------------------------------------------------------------------------


def _build(spec: str, model):
    import torch

    named = [(n, p) for n, p in model.named_parameters()]
    params = [p for _, p in named]
    cfg = model.config
    if spec == "torch-adamw-loop":
        return torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False)
    if spec == "torch-adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if spec == "torch-adamw-fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if spec == "torch-sgd-foreach":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True)
    if spec.startswith("leanopt:"):
        import leanopt

        from ..precision import PRECISIONS

        _, name, *flags = spec.split(":")
        fused = True if "fused" in flags else False if "eager" in flags else None
        compact = {"state_precision": f for f in flags if f in PRECISIONS}
        masked = {"mask": "async"} if "mask" in flags else {}
        return leanopt.create_optimizer(name, model, lr=1e-4, fused=fused, **compact, **masked)
    if spec.startswith("torchao:"):
        import torchao.optim

        return getattr(torchao.optim, spec.split(":")[1])(params, lr=1e-4)
    if spec == "bnb:AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    if spec == "adam_mini":
        import contextlib
        import io

        from adam_mini import Adam_mini

        with contextlib.redirect_stdout(io.StringIO()):
            return Adam_mini(named, lr=1e-4, dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.resolved_kv_heads, verbose=False)
    if spec == "sgd_sai":
        from sgd_sai import SGD_sai

        return SGD_sai(params, lr=1e-4)
    if spec == "lion_pytorch":
        from lion_pytorch import Lion

        return Lion(params, lr=1e-4)
    if spec.startswith("po:"):
        import pytorch_optimizer as po

        cls = getattr(po, spec[3:])
        if spec == "po:AdamMini":
            return cls(model, lr=1e-4, num_embeds=cfg.dim, num_heads=cfg.n_heads, num_query_groups=cfg.resolved_kv_heads)
        return cls(params, lr=1e-4)
    raise ValueError(f"unknown implementation {spec!r}")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _bandwidth_kernels(device: str, dtype, nbytes: int = 256 * 2**20):
    """Streaming kernels over ``nbytes`` arrays: name -> (function, bytes moved)."""
    import torch

    n = nbytes // torch.tensor([], dtype=dtype).element_size()
    a = torch.randn(n, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    c = torch.empty_like(a)
    return {
        "copy": (lambda: c.copy_(a), 2 * nbytes),
        "scale (in place)": (lambda: a.mul_(1.0000001), 2 * nbytes),
        "add": (lambda: torch.add(a, b, out=c), 3 * nbytes),
        "axpy (in place)": (lambda: a.add_(b, alpha=1e-7), 3 * nbytes),
    }


def _timed(fn, sync=lambda: None) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _bandwidths(kernels, sync=lambda: None) -> dict[str, float]:
    """Bytes/s of each streaming kernel of :func:`_bandwidth_kernels`, the best of two runs."""
    return {name: moved / min(_timed(fn, sync) for _ in range(2)) for name, (fn, moved) in kernels.items()}


def main_worker(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..models import GPT, GPTConfig

    torch.set_num_threads(args["threads"])
    device, dtype = args["device"], getattr(torch, args["dtype"])
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig(max_seq_len=8, **MODELS[args["model"]])).to(dtype)
    params = list(model.parameters())
    gen = torch.Generator(device=device).manual_seed(1)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, device=device) * 1e-3).to(dtype)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    kernels = _bandwidth_kernels(device, dtype)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        opt = _build(args["build"], model)
        opt.step()  # creates the state (and, for compiled paths, compiles)
        first_step_s = time.perf_counter() - t0
    from ..registry import state_bytes

    sb = state_bytes(opt)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(args["warmup"]):
        opt.step()
    sync()
    # peak extra memory of one step
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        opt.step()
        sync()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        base = _rss_kb("VmRSS")
        extra = None
        if _reset_peak():
            opt.step()
            extra = max(0, _rss_kb("VmHWM") - base) * 1024
    # the machine is shared: each timed step is paired with bandwidth measured right before
    # it, so that the ratio to the floor compares like with like
    times, bandwidth = [], {name: [] for name in kernels}
    for _ in range(args["steps"]):
        for name, bw in _bandwidths(kernels, sync).items():
            bandwidth[name].append(bw)
        times.append(_timed(opt.step, sync))
    floor_bytes = 2 * param_bytes + param_bytes + 2 * sb  # read+write p, read g, read+write state
    return {
        "n_params": sum(p.numel() for p in params),
        "param_bytes": param_bytes,
        "state_bytes": sb,
        "floor_bytes": floor_bytes,
        "bandwidth": bandwidth,  # per timed step, bytes/s of each kernel
        "times_s": times,
        "first_step_s": first_step_s,
        "peak_extra_bytes": extra,
    }


# --------------------------------------------------------------------------------------
# memory-traffic patterns (--patterns): what a step's passes cost with no arithmetic
# --------------------------------------------------------------------------------------

# name -> (passes as (tensors read, tensors written) over p, g, m, v; the byte floor per float32
# element of the optimizers it bounds, as the table's "floor" counts it)
PATTERNS: dict[str, tuple[tuple[tuple[str, str], ...], int]] = {
    "AdamW; Adam family without mask: pgmv->pmv": ((("pgmv", "pmv"),), 28),
    "Adam-mini, Lion, SGD-SaI: pgm->pm": ((("pgm", "pm"),), 20),
    "Adam family with mask, C kernel: gmv->mv, pmv->pv": ((("gmv", "mv"), ("pmv", "pv")), 28),
    "Adam family with mask, compiled: gmv->, pgmv->pmv": ((("gmv", ""), ("pgmv", "pmv")), 28),
    "Lion, SGD-SaI with mask, compiled: gm->, pgm->pm": ((("gm", ""), ("pgm", "pm")), 20),
    "read only: gmv->": ((("gmv", ""),), 12),
}
# leanopt's C kernels on the same tensors, beside the traffic they make: name -> (kernel, the
# pattern of its passes)
KERNELS: dict[str, tuple[str, str]] = {
    "C kernel: AlphaAdam (async mask)": ("alpha-adam", "Adam family with mask, C kernel: gmv->mv, pmv->pv"),
    "C kernel: AdamW-PMA (K=1: AdamW)": ("adamw", "AdamW; Adam family without mask: pgmv->pmv"),
    "C kernel: Adam-mini (blocks of 768)": ("adam-mini", "Adam-mini, Lion, SGD-SaI: pgm->pm"),
    "C kernel: Lion": ("lion", "Adam-mini, Lion, SGD-SaI: pgm->pm"),
}


def _kernel_step(kind: str, t: dict[str, Any]):
    """One step of a C kernel over the probe tensors (float32, 1-D)."""
    from .. import _native
    from ..adam_mini import adam_mini_step
    from ..alpha_adam import adam_step
    from ..lion import lion_step
    from ..partition import BlockLayout

    common = dict(weight_decay=0.1, maximize=False)
    adam_row = [adam_step(1e-4, 0.9, 0.999, 10, eps=1e-8, **common)]
    if kind in ("alpha-adam", "adamw"):
        mask, alpha, count = ("async", "squared", True) if kind == "alpha-adam" else ("none", "none", False)
        return lambda: _native.adam([t["p"]], [t["g"]], [t["m"]], [t["v"]], adam_row, mask=mask, alpha=alpha, count_scale=count)
    if kind == "adam-mini":
        rows = t["p"].numel() // 768
        views = [t[k][:rows * 768].view(rows, 768) for k in "pgm"]
        row = adam_mini_step(1e-3, 0.9, 0.999, 10, BlockLayout.per_lane((rows, 768)), eps=1e-8, decays=True, **common)
        return lambda: _native.adam_mini_rows(*([x] for x in views), [t["v"][:rows]], [rows], [768], [row])
    return lambda: _native.lion([t["p"]], [t["g"]], [t["m"]], [lion_step(1e-4, 0.9, 0.99, **common)])


def patterns_worker(args: dict[str, Any]) -> dict[str, Any]:
    """Times every pattern of :data:`PATTERNS` with the C stream kernel on float32 arrays,
    each paired with the streaming bandwidth measured right before it."""
    import torch

    from .. import _native

    torch.set_num_threads(args["threads"])
    if _native.library() is None:
        raise RuntimeError("the C kernels are not available here (see leanopt._native)")
    nbytes = args.get("nbytes", 256 * 2**20)
    n = nbytes // 4
    arrays = {k: torch.randn(n) * 1e-3 for k in "pgm"}
    arrays["v"] = torch.rand(n) * 1e-6  # a second moment: the masked kernel keeps phi in its sign bit
    kernels = _bandwidth_kernels("cpu", torch.float32, nbytes)
    runs = {name: (lambda passes=passes: [_native.stream([arrays[k] for k in r], [arrays[k] for k in w]) for r, w in passes])
            for name, (passes, _) in PATTERNS.items()}
    runs.update({name: _kernel_step(kind, arrays) for name, (kind, _) in KERNELS.items()})

    out: dict[str, Any] = {name: {"times_s": [], "best_bandwidth": []} for name in runs}
    for _ in range(args["steps"]):
        for name, run in runs.items():
            best = max(_bandwidths(kernels).values())
            run()  # warm
            out[name]["times_s"].append(_timed(run))
            out[name]["best_bandwidth"].append(best)
    return {"n": n, "patterns": out}


def run_patterns(steps: int = 5, threads: int = 2, nbytes: int = 256 * 2**20, timeout: float = 600.0) -> dict[str, Any]:
    """Each pattern's time per float32 element, its bytes moved, and its time against the
    byte floor of the optimizers it bounds (their floor bytes / best streaming bandwidth);
    ``nbytes`` per tensor (keep it well above the last-level cache)."""
    raw = _spawn({"build": "patterns", "steps": steps, "threads": threads, "nbytes": nbytes}, timeout)
    if "error" in raw:
        raise RuntimeError(raw["error"])
    rows = []
    measured = [*((name, name) for name in PATTERNS), *((name, pattern) for name, (_, pattern) in KERNELS.items())]
    for name, pattern in measured:
        passes, floor_per_elem = PATTERNS[pattern]
        m = raw["patterns"][name]
        moved = 4 * sum(len(set(r)) + len(w) for r, w in passes)
        ratios = [t * bw / (floor_per_elem * raw["n"]) for t, bw in zip(m["times_s"], m["best_bandwidth"])]
        rows.append({"pattern": name, "passes": len(passes), "bytes_per_elem": moved, "floor_bytes_per_elem": floor_per_elem,
                     "ns_per_elem": statistics.median(m["times_s"]) / raw["n"] * 1e9,
                     "gbs": moved * raw["n"] / statistics.median(m["times_s"]) / 1e9,
                     "ratio_to_floor": statistics.median(ratios),
                     "best_bandwidth_gbs": statistics.median(m["best_bandwidth"]) / 1e9})
    return {"threads": threads, "steps": steps, "n": raw["n"], "rows": rows}


def format_patterns(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [f"memory-traffic patterns, float32, {result['n'] * 4 / 2**20:.0f} MiB per tensor, cpu, {result['threads']} "
             f"threads; best streaming kernel {statistics.median(r['best_bandwidth_gbs'] for r in rows):.1f} GB/s", "",
             f"{'pattern':<56} {'passes':>6} {'B/elem':>7} {'ns/elem':>8} {'GB/s':>6} {'floor B':>8} {'x floor':>8}"]
    for r in rows:
        lines.append(f"{r['pattern']:<56} {r['passes']:>6} {r['bytes_per_elem']:>7} {r['ns_per_elem']:>8.3f} {r['gbs']:>6.1f} "
                     f"{r['floor_bytes_per_elem']:>8} {r['ratio_to_floor']:>7.2f}x")
    lines += ["", "each pass reads the tensors left of -> and writes those right of it, with next to no arithmetic; x floor = "
              "its time / (floor B per element / best streaming bandwidth), the floor of the optimizers it bounds as the "
              "step table counts it: no implementation with these passes can be closer to that floor on this machine. "
              "C kernel rows: leanopt's kernels on the same tensors, with the bytes of their passes"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------


def _spawn(args: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    # large blocks straight from mmap, so that freed temporaries leave the resident set
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["OMP_NUM_THREADS"] = str(args["threads"])
    if args["build"].endswith(":compiled"):
        env["LEANOPT_NATIVE"] = "0"
    proc = subprocess.run([sys.executable, "-m", "leanopt.bench.speed", json.dumps(args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_speed(
    model: str = "gpt2-124m",
    dtype: str = "float32",
    device: str = "cpu",
    only: list[str] | None = None,
    steps: int = 10,
    warmup: int = 2,
    repeats: int = 3,
    threads: int = 2,
    timeout: float = 600.0,
    log=print,
) -> dict[str, Any]:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    impls = implementations(device)
    if only:
        impls = [i for i in impls if any(o.lower() in i.name.lower() or o == i.build for o in only)]
        if not impls:
            raise ValueError(f"no implementation matches {only}")
    results: dict[str, list[dict]] = {i.name: [] for i in impls}
    for r in range(repeats):  # interleaved: every configuration once per round
        for impl in impls:
            args = {"model": model, "dtype": dtype, "device": device, "build": impl.build, "steps": steps,
                    "warmup": warmup, "threads": threads}
            out = _spawn(args, timeout)
            results[impl.name].append(out)
            log(f"  round {r + 1}/{repeats} {impl.name}: " + (out["error"] if "error" in out else f"{statistics.median(out['times_s']) * 1e3:.1f} ms"))
    rows = []
    for impl in impls:
        runs = [x for x in results[impl.name] if "error" not in x]
        if not runs:
            rows.append({"name": impl.name, "family": impl.family, "error": results[impl.name][0]["error"]})
            continue
        times = [t for x in runs for t in x["times_s"]]
        best = [max(bw) for x in runs for bw in zip(*x["bandwidth"].values())]  # best kernel at every step
        copy = [bw for x in runs for bw in x["bandwidth"]["copy"]]
        floor_bytes = runs[0]["floor_bytes"]
        ratios = [t * bw / floor_bytes for t, bw in zip(times, best)]
        extras = [x["peak_extra_bytes"] for x in runs if x["peak_extra_bytes"] is not None]
        rows.append({
            "name": impl.name,
            "family": impl.family,
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3,
            "floor_ms": floor_bytes / statistics.median(best) * 1e3,
            "floor_bytes_per_param": floor_bytes / runs[0]["n_params"],
            "ratio_to_floor": statistics.median(ratios),
            "state_bytes_per_param_byte": runs[0]["state_bytes"] / runs[0]["param_bytes"],
            "peak_extra_frac": (statistics.median(extras) / runs[0]["param_bytes"]) if extras else None,
            "first_step_s": statistics.median(x["first_step_s"] for x in runs),
            "bandwidth_copy_gbs": statistics.median(copy) / 1e9,
            "bandwidth_best_gbs": statistics.median(best) / 1e9,
            "n_params": runs[0]["n_params"],
        })
    # time in units of the floor's bandwidth, so that configurations measured minutes apart
    # on a shared machine compare fairly: (ratio to floor × bytes) / the same for fused AdamW
    fused = next((r for r in rows if r["name"] == "torch AdamW (fused)" and "median_ms" in r), None)
    for r in rows:
        if fused and "median_ms" in r:
            r["ratio_to_fused_adamw"] = (r["ratio_to_floor"] * r["floor_bytes_per_param"]) / (
                fused["ratio_to_floor"] * fused["floor_bytes_per_param"])
    return {"model": model, "dtype": dtype, "device": device, "threads": threads, "steps": steps, "repeats": repeats,
            "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    ok = [r for r in rows if "median_ms" in r]
    head = (f"optimizer step, {result['model']} ({ok[0]['n_params'] / 1e6:.1f}M params), {result['dtype']}, "
            f"{result['device']}, {result['threads']} threads; bandwidth: copy {statistics.median(r['bandwidth_copy_gbs'] for r in ok):.1f} GB/s, "
            f"best streaming kernel {statistics.median(r['bandwidth_best_gbs'] for r in ok):.1f} GB/s") if ok else "no results"
    lines = [head, "",
             f"{'implementation':<36} {'median ms':>10} {'min-max ms':>17} {'floor ms':>9} {'x floor':>8} {'x fused AdamW':>14} "
             f"{'state/param':>12} {'peak extra':>11} {'1st step s':>10}"]
    for r in sorted(rows, key=lambda r: (r["family"], r["name"])):
        if "median_ms" not in r:
            lines.append(f"{r['name']:<36} error: {r['error']}")
            continue
        extra = f"{r['peak_extra_frac']:.1%}" if r["peak_extra_frac"] is not None else "n/a"
        lines.append(
            f"{r['name']:<36} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f}-{r['max_ms']:<8.1f} {r['floor_ms']:>9.1f} "
            f"{r['ratio_to_floor']:>7.2f}x {r.get('ratio_to_fused_adamw', float('nan')):>13.2f}x "
            f"{r['state_bytes_per_param_byte']:>11.3f}x {extra:>11} {r['first_step_s']:>10.2f}"
        )
    lines.append("")
    lines.append("floor = (read+write params, read grads, read+write state) bytes / best streaming bandwidth, measured "
                 "right before every timed step; x floor = median over steps of time / floor; x fused AdamW = time "
                 "relative to torch's fused AdamW in units of the bandwidth of the moment; peak extra = memory above "
                 "the resident set during one step, as a share of parameter bytes; 1st step = state creation + compilation")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="leanopt speed")
    p.add_argument("--model", default="gpt2-124m", choices=list(MODELS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="*", help="implementations whose name contains one of these, or whose spec is one of "
                   "them (e.g. torch-adamw-fused, leanopt:adam-mini, leanopt:adam-mini:eager)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--patterns", action="store_true",
                   help="instead: time the memory-traffic patterns of the optimizers' passes (float32, CPU)")
    args = p.parse_args(argv)
    if args.patterns:
        if args.device != "cpu":
            p.error("--patterns measures the CPU (its probes are the C kernels)")
        result = run_patterns(args.steps, args.threads)
        print(format_patterns(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    result = run_speed(args.model, args.dtype, args.device, args.only, args.steps, args.warmup, args.repeats, args.threads)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    # worker mode: one JSON argument, one JSON line out
    worker_args = json.loads(sys.argv[1])
    print(json.dumps((patterns_worker if worker_args["build"] == "patterns" else main_worker)(worker_args)))
