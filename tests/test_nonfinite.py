"""One rule for non-finite gradients on every path (``docs/algorithms.md`` §0).

A NaN or an Inf in one element of a gradient reaches that element's parameter and
per-element state and nothing else: statistics shared across elements (Adam-mini's block
v, the mask's sums, SGD-SaI's g-SNR) leave it out, and the element's parameter becomes
non-finite on every path. ``skip_nonfinite=True`` skips such a parameter's step instead.
(The FSDP2 shards: ``test_distributed.py::test_fsdp2_nonfinite_gradients_follow_the_rule``.)

This file sorts after ``test_fused.py``, whose compiled kernels the "compiled" cases reuse.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import leanopt
from helpers import state_equal, tiny_model
from test_fused import COMPILED, KW

# every leanopt optimizer, and the mask component on the optimizers whose default has none
CASES = [(n, {}) for n in KW] + [
    ("sgd-sai", {"momentum": 0.0}),
    ("sgd-sai", {"variant": "released"}),
    ("adam-mini", {"mask": "async"}),
    ("sgd-sai", {"mask": "async"}),
    ("lion", {"mask": "async"}),
]
# eager: the reference; fused: the C kernels where they take the step (unmasked, or the Adam
# family), else the compiled ones; compiled: the torch.compile kernels only (LEANOPT_NATIVE=0)
PATHS = {"eager": (False, "1"), "fused": (True, "1"), "compiled": (True, "0")}
TARGET = "layers.0.self_attn.k_proj.weight"  # 16 x 32: Adam-mini's blocks are its heads' rows
ELEMENT = (5, 7)


def ids(cases):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in cases]


def build(name, kw, fused, **extra):
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = leanopt.create_optimizer(name, model, fused=fused, **{**KW[name], **kw, **extra})
    return model, opt


def grads(model, gen, bad=None):
    for n, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=gen)
        if n == TARGET and bad is not None:
            p.grad[ELEMENT] = bad


def tensors(model, opt):
    """Every parameter and every state tensor (step counters left out), by name."""
    out = {}
    for n, p in model.named_parameters():
        out[n] = p.detach()
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and k != "step":
                out[f"{n}/{k}"] = v
    return out


def at_element(name: str, t: torch.Tensor, like: torch.Tensor) -> bool:
    """The target and its per-element state (shaped like it: not Adam-mini's block v)."""
    return name.split("/")[0] == TARGET and t.shape == like.shape


def check_contained(got: dict, twin: dict | None) -> None:
    """Non-finite exactly at the element, in the target and its per-element state; every
    other value finite and, given a twin (the same run with that gradient element 0),
    equal to the twin's."""
    for key, t in got.items():
        finite = torch.isfinite(t)
        mine = at_element(key, t, got[TARGET])
        if mine:
            assert not finite[ELEMENT], f"{key}: the bad element did not reach it"
            finite[ELEMENT] = True
        assert finite.all(), f"{key}: {int((~finite).sum())} non-finite values beyond the bad element"
        if twin is not None:
            keep = torch.ones_like(finite)
            if mine:
                keep[ELEMENT] = False
            assert torch.equal(t[keep], twin[key][keep]), f"{key} differs from the run with that gradient element 0"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name,kw", CASES, ids=ids(CASES))
def test_one_bad_element_reaches_that_element_only(name, kw, path, bad, monkeypatch):
    fused, native = PATHS[path]
    if path == "compiled" and (name, kw) not in COMPILED:
        pytest.skip("a compiled-kernel case of test_fused.COMPILED covers this kernel (a compilation costs tens of seconds)")
    monkeypatch.setenv("LEANOPT_NATIVE", native)
    (model, opt), (twin, twin_opt) = build(name, kw, fused), build(name, kw, fused)
    gens = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    # the first step, from fresh state: with that gradient element 0 instead, the element's
    # own update and its terms in every statistic are exactly 0, so the twin differs from
    # this run in that element only
    grads(model, gens[0], bad)
    grads(twin, gens[1], 0.0)
    opt.step()
    twin_opt.step()
    check_contained(tensors(model, opt), tensors(twin, twin_opt))
    # later steps: the non-finite element of the state stays out of the statistics (with the
    # mask, the twin's element has a non-zero update, so only containment is compared)
    masked = opt.param_groups[0]["mask"] != "none" or opt.param_groups[0]["count_scale"]
    for _ in range(2):
        grads(model, gens[0])
        grads(twin, gens[1])
        opt.step()
        twin_opt.step()
    check_contained(tensors(model, opt), None if masked else tensors(twin, twin_opt))


def late_bad_run(name, kw, fused, bad):
    """Three clean steps (so that m ≠ 0 and the mask selects), one with the bad element, two clean."""
    model, opt = build(name, kw, fused)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        grads(model, gen, bad if step == 3 else None)
        opt.step()
    return tensors(model, opt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name,kw", CASES, ids=ids(CASES))
def test_paths_agree_on_a_bad_element_mid_run(name, kw, bad):
    eager, fused = late_bad_run(name, kw, False, bad), late_bad_run(name, kw, True, bad)
    check_contained(eager, None)
    check_contained(fused, None)
    for key, t in eager.items():
        finite = torch.isfinite(t)
        assert torch.equal(finite, torch.isfinite(fused[key])), key
        d = (t[finite].double() - fused[key][finite].double()).norm() / t[finite].double().norm().clamp_min(1e-30)
        assert d <= 1e-6, f"{key}: eager and fused differ by {d:.2e}"


# -- skip_nonfinite ----------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", list(KW))
def test_skip_nonfinite_skips_that_parameter_and_counts_it(name, fused):
    (model, opt), (ref, ref_opt) = build(name, {}, fused, skip_nonfinite=True), build(name, {}, fused)
    gens = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    target, ref_target = dict(model.named_parameters())[TARGET], dict(ref.named_parameters())[TARGET]
    for step in range(4):
        grads(model, gens[0], float("nan") if step in (0, 2) else None)
        grads(ref, gens[1])
        if step in (0, 2):  # the reference: that parameter without a gradient, which torch.optim skips
            ref_target.grad = None
        before = copy.deepcopy(opt.state[target])
        opt.step()
        ref_opt.step()
        if step in (0, 2):
            assert opt.last_nonfinite == [TARGET]
            assert opt.state[target].keys() == before.keys()  # untouched: still empty after step 0
            assert state_equal(opt.state[target], before)
        else:
            assert opt.last_nonfinite == []
    assert opt.nonfinite_skips == 2
    got, want = tensors(model, opt), tensors(ref, ref_opt)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # the count survives a state_dict round trip
    again = build(name, {}, fused, skip_nonfinite=True)[1]
    again.load_state_dict(opt.state_dict())
    assert again.nonfinite_skips == 2


def test_skip_nonfinite_off_by_default_and_a_clean_step_unchanged():
    (a, opt_a), (b, opt_b) = build("alpha-adam", {}, False, skip_nonfinite=True), build("alpha-adam", {}, False)
    assert opt_b.param_groups[0]["skip_nonfinite"] is False
    gens = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(3):
        grads(a, gens[0])
        grads(b, gens[1])
        opt_a.step()
        opt_b.step()
    assert opt_a.nonfinite_skips == 0
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
