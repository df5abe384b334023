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
from helpers import fixed_gradient_steps, max_rel_diff, tiny_model

KW = {
    "adam-mini": dict(lr=1e-2, weight_decay=0.1),
    "sgd-sai": dict(lr=0.1, weight_decay=0.1),
    "alpha-adam": dict(lr=1e-2, weight_decay=0.1),
    "cadamw": dict(lr=1e-2, weight_decay=0.1),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "adamw-pma": dict(lr=1e-2, weight_decay=0.1, period=3),
    "lion-pma": dict(lr=1e-3, weight_decay=0.1, period=3, variant="released"),
}
# On the CPU, the fused steps of these run leanopt's C kernels (leanopt._native, tested in
# test_native.py): Adam-mini's row blocks, the Adam family with or without the mask, and
# unmasked Lion, Lion-PMA and SGD-SaI. The compiled (torch.compile) kernels serve the GPU,
# float64, and the layouts and masks the C kernels do not take: GPT-2's Conv1D columns for
# Adam-mini, the masked Adam-mini, Lion and SGD-SaI.
VARIANTS = [(n, {}) for n in KW] + [
    ("sgd-sai", {"momentum": 0.0}),
    ("alpha-adam", {"mask": "sync", "alpha": "root"}),
    ("alpha-adam", {"mask": "none", "alpha": "none", "count_scale": False}),
    ("adamw-pma", {"variant": "released", "mask": "async"}),
    ("adam-mini", {"value_blocks": "whole"}),
]
# one case per compiled kernel, run on the tiny GPT only: each compilation costs tens of
# seconds on two cores, and the sync mask and root α are arguments of the same kernels
COMPILED = [
    ("alpha-adam", {}),  # the Adam family, masked: two passes
    ("adamw-pma", {}),  # the Adam family without the mask, with PMA's period
    ("lion", {}),
    ("sgd-sai", {}),
    ("adam-mini", {"mask": "async"}),
    ("sgd-sai", {"mask": "async"}),
    ("lion", {"mask": "async"}),
]


def ids(cases):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in cases]


def models(dtype, gpt2=True):
    """The tiny GPT (rows, heads, norms) and a GPT-2 (Conv1D columns, fused QKV, biases)."""
    torch.manual_seed(0)
    out = [tiny_model(dtype=dtype)]
    if gpt2:
        config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
                                         eos_token_id=0)
        out.append(transformers.GPT2LMHeadModel(config).to(dtype))
    return out


def run(name, fused, dtype, maximize=False, steps=20, gpt2=True, **kw):
    out = []
    for model in models(dtype, gpt2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = leanopt.create_optimizer(name, model, fused=fused, maximize=maximize, **{**KW[name], **kw})
        fixed_gradient_steps(list(model.parameters()), opt, steps)
        out += [p.detach() for p in model.parameters()]
    return out


@pytest.mark.parametrize("name,kw", VARIANTS, ids=ids(VARIANTS))
def test_fused_equals_eager_float32(name, kw):
    assert max_rel_diff(run(name, True, torch.float32, **kw), run(name, False, torch.float32, **kw)) <= 1e-6


@pytest.mark.parametrize("name,kw", COMPILED, ids=ids(COMPILED))
def test_compiled_kernels_equal_eager_float32(name, kw, monkeypatch):
    monkeypatch.setenv("LEANOPT_NATIVE", "0")
    compiled, eager = run(name, True, torch.float32, gpt2=False, **kw), run(name, False, torch.float32, gpt2=False, **kw)
    assert max_rel_diff(compiled, eager) <= 1e-6


def test_compiled_kernels_bfloat16_agree_to_rounding(monkeypatch):
    monkeypatch.setenv("LEANOPT_NATIVE", "0")
    fused, eager = (run("adam-mini", f, torch.bfloat16, steps=10, gpt2=False) for f in (True, False))
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in fused)
    assert max_rel_diff(fused, eager) <= 3e-2


@pytest.mark.parametrize("name", ["adam-mini", "alpha-adam", "sgd-sai", "lion"])
def test_fused_maximize(name):
    fused, eager = (run(name, f, torch.float32, maximize=True, steps=5) for f in (True, False))
    assert max_rel_diff(fused, eager) <= 1e-6


@pytest.mark.parametrize("name", ["adam-mini", "adamw-pma", "sgd-sai", "lion"])
def test_fused_bfloat16_agrees_to_rounding(name):
    # compiled bf16 math rounds once per step, eager rounds after every operation
    fused, eager = run(name, True, torch.bfloat16, steps=10), run(name, False, torch.bfloat16, steps=10)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in fused)
    assert max_rel_diff(fused, eager) <= 3e-2


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
    assert max_rel_diff(list(b.parameters()), list(a.parameters())) <= 1e-6


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
from helpers import max_rel_diff, tiny_model
torch._inductor.config.force_disable_caches = True  # generate the code here, not from the disk cache
original = LoopBody.get_read_expr
models = [tiny_model(vocab_size=64) for _ in range(2)]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    warnings.filterwarnings("error", message="leanopt: compiling")  # no fallback to the eager path
    opts = [leanopt.create_optimizer("adam-mini", m, lr=1e-2, weight_decay=0.1, fused=f) for m, f in zip(models, (True, False))]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for ps in zip(*(m.parameters() for m in models)):
            g = torch.randn(ps[0].shape, generator=gen)
            for p in ps:
                p.grad = g.clone()
        for opt in opts:
            opt.step()
assert LoopBody.get_read_expr is original, "the inductor fix leaked out of leanopt's compilations"
print(len(metrics.cpp_outer_loop_fused_inner_counts), max_rel_diff(*models))
"""


@pytest.mark.parametrize("arch,mask", [("torch-mha", "none"), ("gpt-neox", "none"), ("gpt-neox", "async"),
                                       ("torch-mha", "sync")])
def test_adam_mini_fused_qkv_rows_take_the_c_kernel(arch, mask):
    # a fused QKV weight's blocks differ in size (query and key heads of 8 or 16 rows, value
    # neurons of one; GPT-NeoX interleaves them head by head): the C kernel steps each run of
    # equal blocks, to the eager path's result; with the mask, the runs share their tensor's
    # mask sums and count
    from leanopt import _native
    if _native.library() is None:
        pytest.skip("no C kernels on this machine")

    def run(fused):
        torch.manual_seed(0)
        if arch == "torch-mha":
            model, qkv, blocks = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), "self_attn.in_proj_weight", 40
        else:
            config = transformers.GPTNeoXConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                intermediate_size=128)
            model, qkv, blocks = transformers.GPTNeoXForCausalLM(config), "gpt_neox.layers.0.attention.query_key_value.weight", 72
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = leanopt.AdamMini(model, lr=1e-2, weight_decay=0.1, fused=fused, mask=mask)
        assert {r.name: r.blocks for r in opt.describe_partition()}[qkv] == blocks  # 4 + 4 heads, value neurons
        fixed_gradient_steps(list(model.parameters()), opt, 10)
        return [p.detach() for p in model.parameters()], opt

    (fast, opt), (eager, _) = run(None), run(False)
    assert set(opt.last_backends) == {"native"}, opt.last_backends
    assert max_rel_diff(fast, eager) <= 1e-6


def test_adam_mini_masked_column_layout_of_one_element_blocks_keeps_its_mask():
    # a Conv1D of one input: a block per column is a block per element, which the masked C
    # step takes as rows of one element (the column kernels' per-column v must not get it)
    from transformers.pytorch_utils import Conv1D

    def run(fused):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"c_fc": Conv1D(8, 1)})
        opt = leanopt.AdamMini(model, lr=1e-2, mask="async", fused=fused, overrides={"c_fc.weight": "neuron"})
        fixed_gradient_steps(list(model.parameters()), opt, 5)
        return [p.detach() for p in model.parameters()], opt

    (fast, opt), (eager, _) = run(None), run(False)
    assert "eager" not in opt.last_backends
    assert max_rel_diff(fast, eager) <= 1e-6


def test_adam_mini_row_blocks_compile_to_one_pass():
    # embeddings, heads and neurons: each block's sum of g² and its update share one loop
    # over the blocks (inductor's outer-loop fusion), so g, p and m stream from memory once;
    # the fix that makes the fusion compile is undone after every compilation. (In a fresh
    # process, from no cache: the fusion is counted while the code is generated.)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "LEANOPT_NATIVE": "0"}  # the compiled kernel
    done = subprocess.run([sys.executable, "-c", ONE_PASS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fused_loops, diff = done.stdout.split()[-2:]
    assert int(fused_loops) >= 1
    assert float(diff) <= 1e-6  # and the compiled kernel takes the eager path's steps
