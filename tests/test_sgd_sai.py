"""SGD-SaI: parity with the released package, the paper's scale, and the edge cases."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import sgd_sai as sgd_sai_pkg
import torch
from torch import nn

from leanopt import SGDSaI
from helpers import max_rel_diff, tiny_model, train



def reference_snr(g: torch.Tensor, eps: float) -> float:
    """The paper's g-SNR (Sec. 4.1), written out in float64 from its definition."""
    x = g.detach().double().flatten()
    norm = math.sqrt(sum(v * v for v in x.tolist()))
    mean = sum(x.tolist()) / x.numel()
    var = sum((v - mean) ** 2 for v in x.tolist()) / x.numel()
    return norm / math.sqrt(var + eps)


def set_grads(params, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1 + torch.rand((), generator=gen).item())


# --------------------------------------------------------------------------------------
# the released sgd-sai 1.0.3
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,steps", [(torch.float64, 20), (torch.float32, 1)])
def test_released_variant_matches_sgd_sai_package(dtype, steps):
    ref_model = tiny_model(dtype=dtype)
    ours_model = copy.deepcopy(ref_model)
    kw = dict(lr=0.05, momentum=0.9, eps=1e-8, weight_decay=0.1)
    ref = sgd_sai_pkg.SGD_sai(ref_model.parameters(), **kw)
    ours = SGDSaI(ours_model.parameters(), variant="released", **kw)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints at its first step
        for model, opt in ((ref_model, ref), (ours_model, ours)):
            train(model, opt, steps)
    assert max_rel_diff(ours_model, ref_model) <= 1e-6
    for p, q in zip(ref_model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(ours.state[q]["scale"], ref.state[p]["gsnr"].to(dtype), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------
# variant="paper"
# --------------------------------------------------------------------------------------


def test_paper_scale_is_snr_over_global_max():
    params = list(tiny_model().parameters())  # two param groups: the max spans both
    set_grads(params)
    eps = 1e-8
    snr = [reference_snr(p.grad, eps) for p in params]
    opt = SGDSaI([{"params": params[:5]}, {"params": params[5:], "lr": 0.5}], lr=0.1, eps=eps)
    opt.step()
    for p, s in zip(params, snr):
        assert opt.state[p]["scale"].item() == pytest.approx(s / max(snr), rel=1e-5)
    assert max(opt.state[p]["scale"].item() for p in params) == pytest.approx(1.0, rel=1e-6)


def test_paper_update_rule_over_three_steps():
    p = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    q = nn.Parameter(torch.randn(5, dtype=torch.float64))
    lr, mu, wd, eps = 0.1, 0.8, 0.05, 1e-8
    opt = SGDSaI([p, q], lr=lr, momentum=mu, weight_decay=wd, eps=eps)
    grads = [(torch.randn(6, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)) for _ in range(3)]
    snr_p, snr_q = reference_snr(grads[0][0], eps), reference_snr(grads[0][1], eps)
    scale = {"p": snr_p / max(snr_p, snr_q), "q": snr_q / max(snr_p, snr_q)}
    exp = {"p": p.detach().clone(), "q": q.detach().clone()}
    m = {}
    for t, (gp, gq) in enumerate(grads):
        for k, g in (("p", gp), ("q", gq)):
            m[k] = g.clone() if t == 0 else mu * m[k] + (1 - mu) * g
            exp[k] = exp[k] * (1 - lr * wd) - lr * scale[k] * m[k]
        p.grad, q.grad = gp, gq
        opt.step()
    torch.testing.assert_close(p.detach(), exp["p"])
    torch.testing.assert_close(q.detach(), exp["q"])


def test_momentum_zero_is_sgd_with_the_scale():
    p = nn.Parameter(torch.randn(10, dtype=torch.float64))
    r = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    opt = SGDSaI([p, r], lr=0.1, momentum=0.0, weight_decay=0.0)
    for t in range(3):
        set_grads([p, r], seed=t)
        before = p.detach().clone()
        opt.step()
        torch.testing.assert_close(p.detach(), before - 0.1 * opt.state[p]["scale"] * p.grad)
    assert "momentum_buffer" not in opt.state[p]


def test_scales_survive_resume_and_are_never_recomputed():
    model = tiny_model()
    opt = SGDSaI(model.parameters(), lr=0.1)
    train(model, opt, 2)
    scales = {i: opt.state[p]["scale"].clone() for i, p in enumerate(model.parameters())}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = copy.deepcopy(model)
    opt2 = SGDSaI(model2.parameters(), lr=0.1)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p in model2.parameters():
        p.grad = torch.randn_like(p) * 100  # a very different gradient
    opt2.step()
    for i, p in enumerate(model2.parameters()):
        assert torch.equal(opt2.state[p]["scale"], scales[i])


# -- edge cases: never NaN/Inf, documented behaviour --------------------------------------


def finite_everywhere(opt, params):
    for p in params:
        assert torch.isfinite(p).all()
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor):
                assert torch.isfinite(v).all()


def test_scalar_parameter_gets_scale_one_and_stays_out_of_the_max():
    model = tiny_model()
    temperature = nn.Parameter(torch.tensor(1.0))
    params = list(model.parameters())
    set_grads(params)
    temperature.grad = torch.tensor(3.0)
    with_scalar = SGDSaI(params + [temperature], lr=0.1)
    without = SGDSaI(copy.deepcopy(params), lr=0.1)
    for p, q in zip(params, without.param_groups[0]["params"]):
        q.grad = p.grad.clone()
    with_scalar.step()
    without.step()
    assert with_scalar.state[temperature]["scale"].item() == 1.0
    for p, q in zip(params, without.param_groups[0]["params"]):
        assert torch.equal(with_scalar.state[p]["scale"], without.state[q]["scale"])
    finite_everywhere(with_scalar, params + [temperature])


def test_constant_gradient_block_gets_scale_one():
    a = nn.Parameter(torch.randn(4, 4))
    b = nn.Parameter(torch.zeros(8))
    a.grad, b.grad = torch.randn(4, 4), torch.full((8,), 0.25)
    opt = SGDSaI([a, b], lr=0.1)
    opt.step()
    assert opt.state[b]["scale"].item() == 1.0
    assert opt.state[a]["scale"].item() == pytest.approx(1.0)  # a alone defines the max


def test_late_first_gradient_is_scaled_by_the_stored_max_clipped_to_one():
    model = tiny_model()
    late = nn.Parameter(torch.randn(8, 8))
    params = list(model.parameters())
    opt = SGDSaI(params + [late], lr=0.1)
    for step in range(1, 6):
        set_grads(params, seed=step)
        late.grad = None if step < 5 else torch.randn(8, 8)
        before = late.detach().clone()
        opt.step()
        if step < 5:
            assert torch.equal(late, before) and len(opt.state[late]) == 0
    # the stored max comes from the first step's gradients (set_grads with seed=1)
    gen_first = torch.Generator().manual_seed(1)
    first = [torch.randn(p.shape, generator=gen_first) * (1 + torch.rand((), generator=gen_first).item()) for p in params]
    snr_max = max(reference_snr(g, 1e-8) for g in first)
    expected = min(1.0, reference_snr(late.grad, 1e-8) / snr_max)
    assert opt.state[late]["scale"].item() == pytest.approx(expected, rel=1e-5)
    finite_everywhere(opt, params + [late])
    # a late block with a larger g-SNR than the stored max is clipped to 1
    huge = nn.Parameter(torch.randn(64, 64))
    opt.add_param_group({"params": [huge]})
    huge.grad = torch.randn(64, 64) + 10.0  # large mean: large g-SNR
    opt.step()
    assert opt.state[huge]["scale"].item() == 1.0


def test_all_zero_first_gradient_waits_for_a_nonzero_one():
    # LoRA's lora_A gets an exactly zero gradient while lora_B is still zero
    w = nn.Parameter(torch.randn(4, 8))
    a = nn.Parameter(torch.randn(2, 8))
    opt = SGDSaI([w, a], lr=0.1, weight_decay=0.1)
    w.grad, a.grad = torch.randn(4, 8), torch.zeros(2, 8)
    a0 = a.detach().clone()
    opt.step()
    assert opt.state[a]["started"] is False and opt.state[a]["scale"].isnan()  # a placeholder, not a scale
    torch.testing.assert_close(a.detach(), a0 * (1 - 0.1 * 0.1))  # weight decay only
    w.grad, a.grad = torch.randn(4, 8), torch.randn(2, 8)
    opt.step()
    assert 0 < opt.state[a]["scale"].item() <= 1.0
    finite_everywhere(opt, [w, a])


def test_released_variant_edge_cases_stay_finite():
    s = nn.Parameter(torch.tensor(2.0))
    z = nn.Parameter(torch.randn(3))
    late = nn.Parameter(torch.randn(3))
    opt = SGDSaI([s, z, late], lr=1e-3, variant="released", momentum=0.0)
    s.grad, z.grad = torch.tensor(1e-3), torch.zeros(3)
    opt.step()
    assert opt.state[z]["scale"].item() == 0.0  # the package's math: a zero gradient gives scale 0
    late.grad = torch.randn(3)  # the package raises KeyError here; we start the block
    s.grad, z.grad = torch.tensor(1e-3), torch.randn(3)
    opt.step()
    assert opt.state[late]["started"] is True and torch.isfinite(opt.state[late]["scale"])
    finite_everywhere(opt, [s, z, late])
