"""The compiled fast paths (``fused=True``) agree with the eager reference paths."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import leanopt
from leanopt._compile import Kernel
from helpers import tiny_model

KW = {
    "adam-mini": dict(lr=1e-2, weight_decay=0.1),
    "sgd-sai": dict(lr=0.1, weight_decay=0.1),
    "alpha-adam": dict(lr=1e-2, weight_decay=0.1),
    "cadamw": dict(lr=1e-2, weight_decay=0.1),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "adamw-pma": dict(lr=1e-2, weight_decay=0.1, period=3),
    "lion-pma": dict(lr=1e-3, weight_decay=0.1, period=3, variant="released"),
}
VARIANTS = [(n, {}) for n in KW] + [
    ("sgd-sai", {"momentum": 0.0}),
    ("alpha-adam", {"mask": "sync", "alpha": "root"}),
    ("alpha-adam", {"mask": "none", "alpha": "none", "count_scale": False}),
    ("adamw-pma", {"variant": "released", "mask": "async"}),
    ("adam-mini", {"mask": "async"}),
    ("adam-mini", {"mask": "sync", "alpha": "root"}),
    ("adam-mini", {"value_blocks": "whole"}),
    ("sgd-sai", {"mask": "async"}),
    ("sgd-sai", {"momentum": 0.0, "mask": "sync", "count_scale": False}),
    ("lion", {"mask": "async"}),
    ("lion-pma", {"mask": "sync", "alpha": "none"}),
]


def models(dtype):
    """The tiny GPT (rows, heads, norms) and a GPT-2 (Conv1D columns, fused QKV, biases)."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16,
                                                                bos_token_id=0, eos_token_id=0))
    return [tiny_model(dtype=dtype), gpt2.to(dtype)]


def run(name, fused, dtype, maximize=False, steps=20, **kw):
    out = []
    for model in models(dtype):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = leanopt.create_optimizer(name, model, fused=fused, maximize=maximize, **{**KW[name], **kw})
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):  # a fixed gradient stream: rounding cannot feed back through a loss
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        out += [p.detach() for p in model.parameters()]
    return out


def rel(a, b):
    return max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in VARIANTS])
def test_fused_equals_eager_float32(name, kw):
    assert rel(run(name, True, torch.float32, **kw), run(name, False, torch.float32, **kw)) <= 1e-6


# on the CPU, the fused steps of these run hand-written C kernels (leanopt._native, tested in
# test_native.py) where they can; their compiled (torch.compile) kernels, which serve the GPU,
# float64 and the layouts and masks the C kernels do not take, are tested here with them off
NATIVE = {"adam-mini", "alpha-adam", "cadamw", "adamw-pma", "lion", "lion-pma", "sgd-sai"}
COMPILED_ONLY = [(n, kw) for n, kw in VARIANTS if n in NATIVE and (n in ("alpha-adam", "cadamw", "adamw-pma")
                                                                   or kw.get("mask", "none") == "none")]


@pytest.mark.parametrize("name,kw", COMPILED_ONLY,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in COMPILED_ONLY])
def test_compiled_kernels_equal_eager_float32(name, kw, monkeypatch):
    monkeypatch.setenv("LEANOPT_NATIVE", "0")
    assert rel(run(name, True, torch.float32, **kw), run(name, False, torch.float32, **kw)) <= 1e-6


@pytest.mark.parametrize("name", ["adam-mini", "adamw-pma", "sgd-sai", "lion"])
def test_compiled_kernels_bfloat16_agree_to_rounding(name, monkeypatch):
    monkeypatch.setenv("LEANOPT_NATIVE", "0")
    fused, eager = run(name, True, torch.bfloat16, steps=10), run(name, False, torch.bfloat16, steps=10)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in fused)
    assert rel(fused, eager) <= 3e-2


@pytest.mark.parametrize("name", ["adam-mini", "alpha-adam", "sgd-sai", "lion"])
def test_fused_maximize(name):
    assert rel(run(name, True, torch.float32, maximize=True, steps=5), run(name, False, torch.float32, maximize=True, steps=5)) <= 1e-6


@pytest.mark.parametrize("name", ["adam-mini", "adamw-pma", "sgd-sai", "lion"])
def test_fused_bfloat16_agrees_to_rounding(name):
    # compiled bf16 math rounds once per step, eager rounds after every operation
    fused, eager = run(name, True, torch.bfloat16, steps=10), run(name, False, torch.bfloat16, steps=10)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in fused)
    assert rel(fused, eager) <= 3e-2


def test_fused_state_dict_interchangeable_with_eager():
    a, b = tiny_model(), tiny_model()
    eager = leanopt.create_optimizer("adam-mini", a, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in a.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        eager.step()
    b.load_state_dict(a.state_dict())
    fused = leanopt.create_optimizer("adam-mini", b, lr=1e-2, fused=True)
    saved = copy.deepcopy(eager.state_dict())  # as a checkpoint would: not the live state tensors
    fused.load_state_dict({**saved, "param_groups": [{**g, "fused": True} for g in saved["param_groups"]]})
    for p, q in zip(a.parameters(), b.parameters()):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    eager.step()
    fused.step()
    assert rel(list(b.parameters()), list(a.parameters())) <= 1e-6


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    calls = []
    kernel = Kernel(lambda x: calls.append(x) or x * 2)
    with pytest.warns(RuntimeWarning, match="falling back to the eager"):
        assert kernel(3) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        assert kernel(4) == 8
    assert calls == [3, 4]


ONE_PASS = """
import warnings, torch, leanopt
from torch._inductor import metrics
from torch._inductor.loop_body import LoopBody
from helpers import tiny_model
torch._inductor.config.force_disable_caches = True  # generate the code here, not from the disk cache
original = LoopBody.get_read_expr
model = tiny_model(vocab_size=64)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    warnings.filterwarnings("error", message="leanopt: compiling")  # no fallback to the eager path
    opt = leanopt.create_optimizer("adam-mini", model, lr=1e-3, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
assert LoopBody.get_read_expr is original, "the inductor fix leaked out of leanopt's compilations"
print(len(metrics.cpp_outer_loop_fused_inner_counts))
"""


def test_adam_mini_row_blocks_compile_to_one_pass():
    # embeddings, heads and neurons: each block's sum of g² and its update share one loop
    # over the blocks (inductor's outer-loop fusion), so g, p and m stream from memory once;
    # the fix that makes the fusion compile is undone after every compilation
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "LEANOPT_NATIVE": "0"}  # the compiled kernel
    done = subprocess.run([sys.executable, "-c", ONE_PASS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 1
