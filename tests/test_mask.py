"""AlphaAdam, C-AdamW and the mask component shared by every momentum optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import leanopt
from leanopt import AdamMini, AdamWPMA, AlphaAdam, CAdamW, Lion, LionPMA, SGDSaI
from leanopt.mask import masked_update_
from helpers import loss_of, max_rel_diff, tiny_model, train

KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


# the eager path is AdamW operation for operation; the default (the C kernel on the CPU)
# rounds in its own order, which 50 steps grow to a few 1e-6
@pytest.mark.parametrize("fused, tol", [(False, 1e-6), (None, 1e-5)], ids=["eager", "default"])
def test_alpha_adam_without_mask_is_torch_adamw(fused, tol):
    ref_model, model = tiny_model(), tiny_model()
    ref = torch.optim.AdamW(ref_model.parameters(), foreach=False, **KW)
    opt = AlphaAdam(model.parameters(), mask="none", alpha="none", count_scale=False, fused=fused, **KW)
    train(ref_model, ref, 50)
    train(model, opt, 50)
    assert max_rel_diff(model, ref_model) <= tol


@pytest.mark.filterwarnings("ignore::leanopt.PartitionWarning")
def test_defaults_are_the_papers():
    opt = AlphaAdam([nn.Parameter(torch.zeros(2))])
    g = opt.param_groups[0]
    assert (g["mask"], g["alpha"], g["count_scale"]) == ("async", "squared", True)
    c = CAdamW([nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert (c["mask"], c["alpha"], c["count_scale"]) == ("sync", "none", True)
    # on the other optimizers the component is off unless asked for, and a mask on
    # brings AlphaAdam's alpha and count scaling with it
    for cls in (AdamMini, SGDSaI, Lion, AdamWPMA, LionPMA):
        off = cls([nn.Parameter(torch.zeros(2, 2))]).param_groups[0]
        assert (off["mask"], off["alpha"], off["count_scale"]) == ("none", "none", False), cls
        on = cls([nn.Parameter(torch.zeros(2, 2))], mask="async").param_groups[0]
        assert (on["alpha"], on["count_scale"]) == ("squared", True), cls


def two_step_setup(mask, alpha="none", count_scale=False, m_prev=None, g=None):
    """A one-tensor AlphaAdam after step 1 with gradient g1; returns (param, opt, g2)."""
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = AlphaAdam([p], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0, mask=mask, alpha=alpha, count_scale=count_scale)
    p.grad = torch.tensor(m_prev, dtype=torch.float64) / 0.1  # m_1 = (1-β1)·g1 = m_prev
    opt.step()
    p.grad = torch.tensor(g, dtype=torch.float64)
    return p, opt


def test_async_mask_uses_the_previous_momentum_and_sync_the_current():
    # coordinate 0: m_{t-1} small positive, g large negative -> m_t negative:
    #   async (g·m_{t-1} < 0) masks it, sync (g·m_t > 0) keeps it.
    # coordinate 1: both agree; 2: both disagree; 3: m_{t-1} = 0 (async: not > 0)
    m_prev, g = [0.01, 0.5, 0.5, 0.0], [-1.0, 1.0, -0.01, 1.0]
    moved = {}
    for mask in ("async", "sync"):
        p, opt = two_step_setup(mask, m_prev=m_prev, g=g)
        before = p.detach().clone()
        opt.step()
        moved[mask] = (p.detach() != before).tolist()
    assert moved["async"] == [False, True, False, False]
    assert moved["sync"] == [True, True, False, True]


def test_alpha_and_count_scale_per_tensor_as_the_spec():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(7, dtype=torch.float64))
    lr, (b1, b2), eps, wd = 0.05, (0.9, 0.99), 1e-8, 0.1
    for alpha in ("squared", "root", "none"):
        params = [a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()]
        opt = AlphaAdam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, mask="async", alpha=alpha, count_scale=True)
        g1 = [torch.randn_like(x) for x in params]
        g2 = [torch.randn_like(x) for x in params]
        for x, g in zip(params, g1):
            x.grad = g
        opt.step()
        start = [x.detach().clone() for x in params]
        for x, g in zip(params, g2):
            x.grad = g
        opt.step()
        for x, x0, ga, gb in zip(params, start, g1, g2):  # the spec, written out for t = 2
            m1, v1 = (1 - b1) * ga, (1 - b2) * ga * ga
            m2, v2 = b1 * m1 + (1 - b1) * gb, b2 * v1 + (1 - b2) * gb * gb
            u = (m2 / (1 - b1**2)) / ((v2 / (1 - b2**2)).sqrt() + eps)
            phi = (gb * m1 > 0).double()
            ratio = u.square().sum() / (phi * u).square().sum()
            a_t = {"squared": ratio, "root": ratio.sqrt(), "none": 1.0}[alpha]
            eta = lr * x.numel() / (phi.sum() + 1)
            torch.testing.assert_close(x.detach(), x0 * (1 - lr * wd) - eta * a_t * phi * u)


def test_first_step_is_a_plain_adam_step():
    model, ref_model = tiny_model(dtype=torch.float64), tiny_model(dtype=torch.float64)
    opt = AlphaAdam(model.parameters(), **KW)  # async mask, α, count scale
    ref = torch.optim.AdamW(ref_model.parameters(), **KW)
    start = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    train(ref_model, ref, 1)
    # m_0 = 0 selects nothing, so φ falls back to all ones: α = 1 and η̂ = lr·n/(n+1)
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), start):
        n = p.numel()
        decay = p0 * (1 - KW["lr"] * KW["weight_decay"])
        torch.testing.assert_close(p - decay, (q - decay) * n / (n + 1))


@pytest.mark.parametrize("alpha", ["squared", "root", "none"])
def test_empty_mask_or_zero_update_never_gives_nan(alpha):
    p = nn.Parameter(torch.ones(6))
    opt = AlphaAdam([p], lr=0.1, mask="async", alpha=alpha)
    for g in (torch.ones(6), -torch.ones(6), torch.zeros(6), -torch.ones(6)):
        p.grad = g  # the second gradient disagrees with m everywhere: empty mask
        opt.step()
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())
    q = torch.zeros(3)
    masked_update_(q, torch.zeros(3), torch.zeros(3, dtype=torch.bool), 0.1, alpha=alpha, count_scale=True)
    assert torch.equal(q, torch.zeros(3))


# --------------------------------------------------------------------------------------
# the component on the other momentum optimizers
# --------------------------------------------------------------------------------------


def first_moment(opt, p):
    st = opt.state[p]
    return st["momentum_buffer"] if "momentum_buffer" in st else st["exp_avg"]


OPTIMIZERS = {
    "adam-mini": lambda model, **kw: AdamMini(model.parameters(), model=model, lr=1e-2, **kw),
    "sgd-sai": lambda model, **kw: SGDSaI(model.parameters(), lr=0.1, weight_decay=0.0, **kw),
    "lion": lambda model, **kw: Lion(model.parameters(), lr=1e-3, **kw),
    "adamw-pma": lambda model, **kw: AdamWPMA(model.parameters(), lr=1e-2, weight_decay=0.0, period=3, **kw),
    "lion-pma": lambda model, **kw: LionPMA(model.parameters(), lr=1e-3, period=3, **kw),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mask_none_is_the_unmasked_optimizer(name):
    a, b = tiny_model(), tiny_model()
    plain = OPTIMIZERS[name](a)
    explicit = OPTIMIZERS[name](b, mask="none", alpha="squared", count_scale=False)  # α is 1 when φ ≡ 1
    train(a, plain, 7)
    train(b, explicit, 7)
    assert max_rel_diff(a, b) == 0.0


@pytest.mark.parametrize("mask", ["async", "sync"])
@pytest.mark.parametrize("alpha,count_scale", [("none", False), ("squared", True)])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mask_changes_only_masked_coordinates(name, mask, alpha, count_scale):
    """From the same state and gradient, the masked step is φ ⊙ (unmasked step), scaled
    per tensor by α·n/(||φ||₀+1) — every optimizer's own u and m, one shared component."""
    model = tiny_model(dtype=torch.float64)
    opt = OPTIMIZERS[name](model)
    train(model, opt, 4)  # mid-period for the PMA optimizers, non-zero momenta everywhere
    masked_model, masked = copy.deepcopy((model, opt))
    for group in masked.param_groups:
        group.update(mask=mask, alpha=alpha, count_scale=count_scale)
    before = [p.detach().clone() for p in model.parameters()]
    m_prev = [first_moment(opt, p).clone() for p in model.parameters()]
    for m, o in ((model, opt), (masked_model, masked)):
        o.zero_grad()
        loss_of(m, 4).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    masked.step()
    for p, q, p0, g, mp in zip(model.parameters(), masked_model.parameters(), before, grads, m_prev):
        delta = p.detach() - p0
        phi = (g * (mp if mask == "async" else first_moment(opt, p))) > 0
        if not (phi * delta).abs().sum() > 0:
            phi = torch.ones_like(phi)  # the empty-mask fallback
        scale = 1.0
        if alpha == "squared":
            scale = delta.square().sum() / (phi * delta).square().sum()
        if count_scale:
            scale = scale * p.numel() / (phi.sum() + 1)
        torch.testing.assert_close(q.detach() - p0, scale * phi * delta, rtol=1e-9, atol=1e-15)


def test_async_mask_needs_momentum_on_sgd_sai():
    with pytest.raises(ValueError, match="momentum"):
        SGDSaI([nn.Parameter(torch.zeros(3))], momentum=0.0, mask="async")
    SGDSaI([nn.Parameter(torch.zeros(3))], momentum=0.0, mask="sync")  # g·g: fine


def test_memory_light_alpha_adam():
    """Adam-mini with the async mask trains and keeps Adam-mini's state size."""
    model = tiny_model()
    opt = leanopt.create_optimizer("adam-mini", model, lr=1e-2, mask="async")
    losses = train(model, opt, 30, fixed_batch=True)
    assert losses[-1] < 0.5 * losses[0]
    state = sum(t.numel() for st in opt.state.values() for k, t in st.items() if k != "step")
    assert state == sum(r.state_elements for r in opt.describe_partition())
