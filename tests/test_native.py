"""The hand-written CPU kernels (``leanopt._native``) take the same steps as the eager paths.

``fused=True`` on the CPU runs Adam-mini (row blocks), the Adam family (AlphaAdam, C-AdamW,
AdamW-PMA), Lion, Lion-PMA and SGD-SaI (a momentum buffer for its mask), with or without the
mask, through them. Tensors here are large enough to be split over threads (and, for Adam-mini, rows shared by all threads), with sizes that are
not multiples of the kernels' cache-line shares.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import leanopt
from leanopt import _native
from helpers import fixed_gradient_steps, max_rel_diff, tiny_model

pytestmark = pytest.mark.skipif(not _native.enabled() or _native._compiler() is None,
                                reason="the CPU kernels need Linux and a C compiler")

CASES = [
    ("adam-mini", dict(lr=1e-2, weight_decay=0.1)),
    ("adam-mini", dict(lr=1e-2, weight_decay=0.1, value_blocks="whole", betas=(0.3, 0.99))),  # lerp weight ≥ 0.5
    ("adam-mini", dict(lr=1e-2, weight_decay=0.1, mask="async")),  # AlphaAdam's mask at Adam-mini's memory
    ("adam-mini", dict(lr=1e-2, weight_decay=0.1, mask="sync", alpha="root", value_blocks="whole", betas=(0.3, 0.99))),
    ("adam-mini", dict(lr=1e-2, weight_decay=0.1, mask="none", count_scale=True)),
    ("alpha-adam", dict(lr=1e-2, weight_decay=0.1)),
    ("alpha-adam", dict(lr=1e-2, weight_decay=0.1, mask="sync", alpha="root")),
    ("alpha-adam", dict(lr=1e-2, weight_decay=0.1, mask="none", alpha="none", count_scale=True)),
    ("cadamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adamw-pma", dict(lr=1e-2, weight_decay=0.1, period=3)),
    ("adamw-pma", dict(lr=1e-2, weight_decay=0.1, period=3, variant="released", mask="async")),
    ("adamw-pma", dict(lr=1e-2, weight_decay=0.1, period=2, mask="sync")),  # masked with the moments' rescale
    ("lion", dict(lr=1e-3, weight_decay=0.1)),
    ("lion", dict(lr=1e-3, weight_decay=0.1, mask="sync")),
    ("lion-pma", dict(lr=1e-3, weight_decay=0.1, period=2, mask="async")),  # masked with the momentum's rescale
    ("lion-pma", dict(lr=1e-3, weight_decay=0.1, period=3, variant="released")),
    ("sgd-sai", dict(lr=0.1, weight_decay=0.1)),
    ("sgd-sai", dict(lr=0.1, weight_decay=0.1, momentum=0.0)),
    ("sgd-sai", dict(lr=0.1, weight_decay=0.1, mask="async")),
]
KERNEL = {"adam-mini": "adam_mini_rows", "lion": "lion", "lion-pma": "lion", "sgd-sai": "sgd_sai"}  # the others: "adam"


def kernel(name, kw):
    masked = kw.get("mask", "none") != "none" or kw.get("count_scale", False)
    if masked and name in ("adam-mini", "lion", "lion-pma", "sgd-sai"):
        return "adam_mini_masked" if name == "adam-mini" else "elementwise_masked"
    return KERNEL.get(name, "adam")
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items() if k not in ('lr', 'weight_decay'))}" for n, kw in CASES]


def wide_model(dtype=torch.float32):
    # embedding 300x272 and MLP 288x272: rows split over threads; heads of 136x272 and the
    # single-block value projection ("whole"): rows shared by all threads
    return tiny_model(dtype=dtype, vocab_size=300, dim=272, n_heads=2, n_layers=1, mlp_hidden=288)


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(name, kw, fused, dtype=torch.float32, steps=20, model=None):
    model = model or wide_model(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = leanopt.create_optimizer(name, model, fused=fused, **kw)
    fixed_gradient_steps(list(model.parameters()), opt, steps)
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.fixture
def calls(monkeypatch):
    """Counts the tensors each kernel steps (and proves the fused path used it)."""
    seen = {"adam": 0, "adam_mini_rows": 0, "adam_mini_masked": 0, "elementwise_masked": 0, "lion": 0, "sgd_sai": 0}
    for name in seen:
        original = getattr(_native, name)

        def spy(*args, _original=original, _name=name, **kw):
            seen[_name] += len(args[1] if isinstance(args[0], str) else args[0])  # (elementwise_masked: family first)
            return _original(*args, **kw)

        monkeypatch.setattr(_native, name, spy)
    return seen


def test_the_kernels_build_on_this_machine():
    assert _native.library() is not None


@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_native_equals_eager_float32(name, kw, nthreads, calls):
    with threads(nthreads):
        fused, opt = run(name, kw, True)
    eager, _ = run(name, kw, False)
    steps = 19 if name == "sgd-sai" else 20  # SGD-SaI's first step is its g-SNR: eager by design
    assert calls[kernel(name, kw)] >= steps * len(fused)  # every tensor at every step
    assert max_rel_diff(fused, eager) <= 1e-6


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_native_bfloat16_is_closer_to_float32_than_eager(name, kw):
    # bfloat16: the kernels compute in float32 and round what they store; the eager path rounds
    # after every operation. From the same bfloat16 start and gradients, the kernels must land
    # at least as close to the float32 computation as the eager path does
    def trajectory(fused, dtype):
        model = wide_model(torch.bfloat16).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = leanopt.create_optimizer(name, model, fused=fused, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(dtype)
            opt.step()
        return [p.detach().float() for p in model.parameters()]

    reference = trajectory(False, torch.float32)
    native, eager = trajectory(True, torch.bfloat16), trajectory(False, torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in native)
    assert max_rel_diff(native, reference) <= max_rel_diff(eager, reference)
    assert max_rel_diff(native, eager) <= 3e-2  # the compiled kernels' tolerance (test_fused.py)


def test_odd_sizes_and_mixed_dtypes_in_one_group():
    # plain tensors whose sizes are not multiples of 64, float32 and bfloat16 in one group
    def params():
        torch.manual_seed(0)
        shapes = [(70001,), (333, 101), (5,), (64, 1025)]
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        return ps + [torch.nn.Parameter(torch.randn(40003).bfloat16())]

    out = {}
    for fused in (True, False):
        ps = params()
        opt = leanopt.AlphaAdam(ps, lr=1e-2, weight_decay=0.1, fused=fused)
        fixed_gradient_steps(ps, opt, 10)
        out[fused] = [p.detach().clone() for p in ps]
    assert max_rel_diff(out[True][:4], out[False][:4]) <= 1e-6
    assert max_rel_diff(out[True][4:], out[False][4:]) <= 3e-2


def test_native_off_uses_the_compiled_path(monkeypatch, calls):
    monkeypatch.setenv("LEANOPT_NATIVE", "0")
    model = tiny_model()
    fused, _ = run("alpha-adam", dict(lr=1e-2, mask="none", alpha="none", count_scale=False), True, steps=3, model=model)
    eager, _ = run("alpha-adam", dict(lr=1e-2, mask="none", alpha="none", count_scale=False), False, steps=3,
                   model=tiny_model())
    assert not any(calls.values())
    assert max_rel_diff(fused, eager) <= 1e-6


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_native, "_build", broken)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_tried", False)
    with pytest.warns(RuntimeWarning, match="CPU kernels could not be built"):
        assert _native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once, not at every step
        assert _native.library() is None
        fused, _ = run("lion", dict(lr=1e-3), True, steps=3, model=tiny_model())
    eager, _ = run("lion", dict(lr=1e-3), False, steps=3, model=tiny_model())
    assert max_rel_diff(fused, eager) <= 1e-6


def test_build_is_cached_by_content(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    first = _native._build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert _native._build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [f.name for f in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_autograd_sees_the_kernels_writes():
    # a parameter saved for backward and then changed by a step must be caught, as with
    # torch's own in-place operations
    for name in ("adam-mini", "alpha-adam"):
        model = tiny_model()
        opt = leanopt.create_optimizer(name, model, lr=1e-2, fused=True)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        w = model.lm_head.weight
        loss = (w * w).sum()
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("nthreads,mask", [(1, "none"), (3, "none"), (1, "async"), (3, "sync"), (3, "count")])
def test_adam_mini_column_blocks_run_in_c(nthreads, mask, monkeypatch):
    # transformers' Conv1D stores (in, out): Adam-mini's blocks are runs of columns (c_attn's heads
    # of 68 columns, then neurons); wide enough (272 x 1088) that the rows are split over threads.
    # With the mask (or the count scale alone): each column's v first, then the mask's two passes
    # from each column's scale
    transformers = pytest.importorskip("transformers")
    seen = []
    original = _native.adam_mini_cols if mask == "none" else _native.adam_mini_masked
    monkeypatch.setattr(_native, original.__name__, lambda *a, **k: (seen.append(len(a[0])), original(*a, **k))[1])

    def gpt2():
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_embd=272, n_layer=1, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
                                         eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)

    kw = dict(lr=1e-2, weight_decay=0.1, **(dict(mask="none", count_scale=True) if mask == "count" else dict(mask=mask)))
    with threads(nthreads):
        fused, opt = run("adam-mini", kw, True, model=gpt2(), steps=10)
    eager, _ = run("adam-mini", kw, False, model=gpt2(), steps=10)
    assert opt.last_backends == {"native": len(fused)}
    if mask == "none":
        assert seen == [4] * 10  # c_attn, c_proj, c_fc, mlp.c_proj at every step
    else:  # (and a call for the row layouts)
        assert seen.count(4) == 10 and len(seen) == 20
    assert max_rel_diff(fused, eager) <= 1e-6
