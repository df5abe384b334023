"""Low-precision state and stochastic rounding (leanopt.precision, docs/algorithms.md §8).

The battery (test_battery.py) runs every precision of every optimizer; here: the codes
themselves against independent formulas, the rounding's statistics, the failure that
stochastic rounding exists to prevent, bad input, and conversion between precisions.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import leanopt
from leanopt import precision as P
from helpers import fixed_gradient_steps, loss_of, tiny_model, train


def roundtrip(x: torch.Tensor, fmt: str, kind: str, block: int = 256) -> torch.Tensor:
    like = torch.empty(x.shape)
    state = {"m" + suffix: v for suffix, v in P.encode(x, fmt, kind, like, block, None).items()}
    return P.decode(state, "m", kind, like)


def test_int8_codes_match_the_formula_blockwise_along_the_last_dimension():
    torch.manual_seed(0)
    x = torch.randn(3, 300)  # 300 = 256 + a ragged block of 44
    codes = P.encode(x, "int8", P.MOMENT, x, 256, None)
    assert codes[""].dtype == torch.int8 and codes[""].shape == (3, 300)
    absmax = torch.stack([x[:, :256].abs().amax(1), x[:, 256:].abs().amax(1)], dim=1)
    torch.testing.assert_close(codes["_absmax"], absmax)
    # x ≈ a·sign(c)·(c/127)², c = round(127·sqrt(|x|/a)): written out independently
    a = torch.cat([absmax[:, :1].expand(3, 256), absmax[:, 1:].expand(3, 44)], dim=1)
    want = (torch.sqrt(x.abs() / a) * 127).round() * x.sign()
    assert torch.equal(codes[""].to(torch.float32), want)
    back = roundtrip(x, "int8", P.MOMENT)
    # the worst error is half a code step at the top of the block: a·(1 − (126.5/127)²)
    assert ((back - x).abs() <= a * (1 - (126.5 / 127) ** 2) + 1e-7).all()


def test_the_square_code_map_is_finer_than_a_linear_one_for_small_entries():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(torch.tensor(3.0)).sample((64, 256))
    a = x.abs().amax(1, keepdim=True)
    linear = (x / a * 127).round() / 127 * a
    square = roundtrip(x, "int8", P.MOMENT)
    small = x.abs() < 0.05 * a
    rel = lambda y: ((y - x)[small].abs() / x[small].abs()).mean().item()  # noqa: E731
    assert rel(square) < 0.6 * rel(linear), (rel(square), rel(linear))
    assert (square - x).norm() < (linear - x).norm()


def test_second_moments_are_coded_in_the_root_domain_and_never_become_zero():
    torch.manual_seed(0)
    v = torch.randn(4, 512).square()
    v[0, 0] = 1e-30  # far below the block's resolution: kept as the smallest code, not 0
    back = roundtrip(v, "int8", P.SECOND)
    assert (back > 0).all()
    codes = P.encode(v, "int8", P.SECOND, v, 256, None)[""]
    assert codes.dtype == torch.uint8 and codes[0, 0] == 1
    big = v > 1e-2 * v.amax()
    assert ((back - v)[big].abs() / v[big]).max() < 0.1


def test_int4_packs_two_codes_per_byte_and_decodes_to_the_nearest_level():
    torch.manual_seed(0)
    x = torch.randn(5, 33)  # odd length: the last byte holds one code
    codes = P.encode(x, "int4", P.MOMENT, x, 16, None)[""]
    assert codes.dtype == torch.uint8 and codes.shape == (5, 17)
    back = roundtrip(x, "int4", P.MOMENT, block=16)
    levels = torch.tensor([(c / 7) ** 2 for c in range(8)])
    blocks = [(0, 16), (16, 32), (32, 33)]
    for lo, hi in blocks:
        a = x[:, lo:hi].abs().amax(1, keepdim=True)
        y = x[:, lo:hi].abs() / a
        nearest = levels[(y.sqrt() * 7).round().long()]  # nearest in the root domain
        torch.testing.assert_close(back[:, lo:hi], nearest * a * x[:, lo:hi].sign())


def test_a_state_saved_with_another_block_size_still_decodes():
    torch.manual_seed(0)
    x = torch.randn(2, 1000)
    for block in (2, 64, 128, 512, 2048):
        state = {"m" + s: v for s, v in P.encode(x, "int8", P.MOMENT, x, block, None).items()}
        assert (P.decode(state, "m", P.MOMENT, x) - x).abs().max() < 0.02 * x.abs().max()


def test_stochastic_rounding_is_unbiased_and_round_to_nearest_is_not():
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # an eighth of the way from bf16 1.0 to 1.0078125
    out = torch.empty_like(x, dtype=torch.bfloat16)
    P.stochastic_round_(out, x, P.rounding_key(0, 0, 0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(out.float().mean().item() - x[0].item()) < 3e-5  # std of the mean: 2^-7·sqrt(p(1-p)/n) ≈ 1e-5
    assert x.bfloat16().float().mean().item() == 1.0
    special = torch.tensor([math.inf, -math.inf, math.nan, -3.0, 0.0])
    got = P.stochastic_round_(torch.empty(5, dtype=torch.bfloat16), special, None).float()
    assert got[0] == math.inf and got[1] == -math.inf and got[2].isnan() and got[3] == -3.0 and got[4] == 0.0


def test_the_c_and_eager_stochastic_rounding_draw_the_same_bits(monkeypatch):
    from leanopt import _native
    if _native.library() is None:
        pytest.skip("no C kernels on this machine")
    torch.manual_seed(0)
    x = torch.randn(100_003) * torch.logspace(-30, 30, 100_003)
    x[:4] = torch.tensor([math.inf, -math.inf, math.nan, torch.finfo(torch.float32).max])
    fast = P.stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), x, 12345)
    monkeypatch.setattr(_native, "library", lambda: None)
    eager = P.stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), x, 12345)
    assert torch.equal(fast[4:], eager[4:]) and fast[3] == eager[3]  # the largest float may round up to inf
    assert fast[0] == math.inf and fast[1] == -math.inf and fast[2].isnan() and eager[2].isnan()
    # each result is one of the two bf16 neighbours of x
    lo = x[4:].bfloat16().float()
    assert ((fast[4:].float() - x[4:]).abs() <= (x[4:].abs() * 2.0**-7)).all() and not torch.equal(fast[4:].float(), lo)
    assert not torch.equal(fast, P.stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), x, 12346))


def _bf16_fit(stochastic: bool, seed: int = 0, steps: int = 200) -> nn.Parameter:
    # every Adam step (~lr) is below half a bf16 step of weights near 1 (2^-8): rounding to
    # nearest loses all of them, stochastic rounding keeps them on average
    torch.manual_seed(seed)
    w = nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    opt = leanopt.AlphaAdam([w], lr=1e-3, mask="none", alpha="none", count_scale=False, weight_decay=0.0,
                            stochastic_rounding=stochastic)
    target = 1.1 + 0.01 * torch.randn(256)
    for _ in range(steps):
        opt.zero_grad()
        ((w.float() - target) ** 2).sum().backward()
        opt.step()
    return w


def test_pure_bf16_training_stalls_without_stochastic_rounding_and_learns_with_it():
    stalled, learned = _bf16_fit(False), _bf16_fit(True)
    assert (stalled.float() == 1.0).all()
    assert abs(learned.float().mean().item() - 1.1) < 0.02  # 200 steps of ~1e-3 reach the target


def test_stochastic_rounding_is_reproducible_under_a_seed():
    assert torch.equal(_bf16_fit(True, seed=3, steps=20), _bf16_fit(True, seed=3, steps=20))
    assert not torch.equal(_bf16_fit(True, seed=3, steps=20), _bf16_fit(True, seed=4, steps=20))


def test_bf16_state_keeps_small_ema_updates_that_round_to_nearest_loses():
    # β2 = 0.999 from v = 1: each step moves v by 1e-3, under half a bf16 step (2^-8)
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(4096))
    opt = leanopt.AlphaAdam([p], lr=0.0, betas=(0.9, 0.999), mask="none", alpha="none", count_scale=False,
                            state_precision="bf16")
    p.grad = torch.ones(4096)
    opt.step()
    opt.state[p]["exp_avg_sq"].fill_(1.0)
    for _ in range(200):
        p.grad = torch.zeros(4096)
        opt.step()
    v = opt.state[p]["exp_avg_sq"].float()
    assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    exact = 0.999**200  # 0.8186
    assert abs(v.mean().item() - exact) < 0.01
    assert torch.tensor(1.0).bfloat16() * 0.999 == 1.0  # round to nearest would never have moved


@pytest.mark.parametrize("kwargs, pattern", [
    ({"state_precision": "fp8"}, "state_precision"),
    ({"state_precision": {"exp_avg": "int2"}}, r"state_precision\['exp_avg'\]"),
    ({"state_precision": {"exp_avg_sq": "int4"}}, "int4 is for momenta only"),
    ({"state_precision": {"momentum": "int8"}}, "not a per-element state"),
    ({"state_block_size": 100}, "state_block_size"),
    ({"state_block_size": 0}, "state_block_size"),
    ({"state_block_size": 256.0}, "state_block_size"),
    ({"state_min_size": -1}, "state_min_size"),
    ({"stochastic_rounding": True}, "stochastic_rounding=True is for bfloat16"),
    ({"stochastic_rounding": 1}, "stochastic_rounding"),
])
def test_bad_precision_arguments_raise_naming_them(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        leanopt.AlphaAdam(tiny_model().parameters(), **kwargs)


def test_a_bad_precision_in_a_param_group_names_the_group():
    ps = list(tiny_model().parameters())
    with pytest.raises(ValueError, match="state_block_size.*param group 1"):
        leanopt.Lion([{"params": ps[:2]}, {"params": ps[2:], "state_block_size": 3}])


def test_loading_a_state_of_another_precision_converts_it_with_a_note():
    model = tiny_model()
    saved_by = leanopt.AlphaAdam(model.parameters(), state_precision="param", state_min_size=0)
    train(model, saved_by, 3)
    saved = saved_by.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    loader = leanopt.AlphaAdam(model.parameters(), state_precision="int8", state_min_size=0)
    with pytest.warns(UserWarning, match=r"converted state tensors .*from param to int8") as caught:
        loader.load_state_dict(torch.load(buf, weights_only=True))
    assert len(caught) == 1
    for p in model.parameters():
        st, full = loader.state[p], saved_by.state[p]
        assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
        m = P.decode(st, "exp_avg", P.MOMENT, p)
        assert (m - full["exp_avg"]).abs().max() <= 0.02 * full["exp_avg"].abs().max() + 1e-12
    # and back: int8 → param restores the decoded values, and steps on
    back = leanopt.AlphaAdam(model.parameters(), state_min_size=0)
    with pytest.warns(UserWarning, match="from int8 to param"):
        back.load_state_dict(loader.state_dict())
    assert all(back.state[p]["exp_avg"].dtype == torch.float32 for p in model.parameters())
    train(model, back, 1)


def test_the_same_precision_loads_without_a_note(recwarn):
    model = tiny_model()
    opt = leanopt.AdamMini(model, state_precision="int4", state_min_size=0)
    train(model, opt, 2)
    other = leanopt.AdamMini(model, state_precision="int4", state_min_size=0)
    other.load_state_dict(opt.state_dict())
    assert not [w for w in recwarn if "converted" in str(w.message)]


def test_small_tensors_keep_full_precision_by_default():
    model = tiny_model()
    opt = leanopt.SGDSaI(model.parameters(), lr=0.1, state_precision="int8")
    train(model, opt, 2)
    for p in model.parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert buf.dtype == (torch.int8 if p.numel() >= 4096 else torch.float32), (p.shape, buf.dtype)


# -- against the peers: torch's AdamW, bitsandbytes' and torchao's 8-/4-bit AdamW ----------


def updates(make, steps: int = 30) -> dict[str, torch.Tensor]:
    """What ``steps`` steps of ``make(params)`` moved each tensor of a small GPT (the tensors
    of >= 4096 elements: those every implementation quantizes)."""
    model = tiny_model(dim=64, n_heads=4, n_kv_heads=4, mlp_hidden=256)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make(model.parameters())
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    return {n: p.detach() - start[n] for n, p in model.named_parameters() if p.numel() >= 4096}


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(((a[n] - b[n]) ** 2).sum().item() for n in b) / sum((b[n] ** 2).sum().item() for n in b))


def test_leanopt_adamw_is_torch_adamw_and_the_registry_builds_it_for_compact_state():
    model = nn.Linear(8, 8)
    assert type(leanopt.create_optimizer("adamw", model)) is torch.optim.AdamW
    assert type(leanopt.create_optimizer("adamw", model, state_precision="int8")) is leanopt.AdamW
    ours = updates(lambda ps: leanopt.AdamW(ps, lr=1e-3))
    theirs = updates(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))
    assert distance(ours, theirs) < 1e-5


def test_compact_adamw_tracks_full_precision_at_least_as_closely_as_the_peers():
    bnb = pytest.importorskip("bitsandbytes")
    torchao_optim = pytest.importorskip("torchao.optim")
    full = updates(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))
    error = {name: distance(updates(make), full) for name, make in {
        "int8": lambda ps: leanopt.AdamW(ps, lr=1e-3, state_precision="int8"),
        "int4": lambda ps: leanopt.AdamW(ps, lr=1e-3, state_precision="int4", state_block_size=128),
        "bf16": lambda ps: leanopt.AdamW(ps, lr=1e-3, state_precision="bf16"),
        "bnb-8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=1e-2, min_8bit_size=4096),
    }.items()}
    with torch.compiler.set_stance("force_eager"):  # torchao compiles its step: seconds per shape on a CPU
        error["torchao-8bit"] = distance(updates(lambda ps: torchao_optim.AdamW8bit(ps, lr=1e-3, weight_decay=1e-2)), full)
        error["torchao-4bit"] = distance(updates(lambda ps: torchao_optim.AdamW4bit(ps, lr=1e-3, weight_decay=1e-2)), full)
    # each peer's error is real (they quantize), and ours is no larger at the same bits
    # (int4 here: 4-bit momenta with 8-bit second moments, torchao's 4-bit has both at 4)
    assert 0 < error["bf16"] < error["int8"] <= min(error["bnb-8bit"], error["torchao-8bit"]), error
    assert error["int4"] <= error["torchao-4bit"], error


# -- the C codec (leanopt/csrc/cpu_codec.h) against the formulas and the eager codec ------


@pytest.mark.parametrize("fmt,kind", [("int8", P.MOMENT), ("int8", P.SECOND), ("int4", P.MOMENT)])
def test_the_c_codec_gives_the_formula_and_agrees_with_the_eager_one(fmt, kind, monkeypatch):
    from leanopt import _native
    if _native.library() is None:
        pytest.skip("no C kernels on this machine")
    torch.manual_seed(0)
    x = torch.randn(37, 300) * 1e-3  # a ragged last block of 44
    if kind == P.SECOND:
        x = x.square()
        x[0, :5] = 0.0
    like = torch.empty(x.shape)
    fast = P.encode(x, fmt, kind, like, 256, None)
    # the formula in float64: block scales, then c = round(top · sqrt(|x|/a)) (second moments: in the root domain)
    top = {"int8": 127 if kind == P.MOMENT else 255, "int4": 7}[fmt]
    root = x.double().sqrt() if kind == P.SECOND else x.double()
    a = torch.cat([root[:, :256].abs().amax(1, keepdim=True).expand(-1, 256),
                   root[:, 256:].abs().amax(1, keepdim=True).expand(-1, 44)], 1)
    exact = (root.abs() / a).sqrt() * top
    want = exact.round() * root.sign()
    if kind == P.SECOND:
        want = torch.where(root > 0, want.clamp(min=1), want)
    codes = fast[""].to(torch.int16)
    if fmt == "int4":
        codes = torch.stack([codes & 15, codes >> 4], -1).reshape(37, -1)[:, :300] - 8
    near_tie = ((exact - exact.floor()) - 0.5).abs() < 1e-4  # float32 may round these either way
    assert torch.equal(codes[~near_tie].double(), want[~near_tie])
    assert (codes[near_tie].double() - want[near_tie]).abs().max() <= 1 if near_tie.any() else True
    # the eager codec: the same decoded values from the same codes, codes at most one step apart
    # (torch's vectorized sqrt is not always correctly rounded; the C one is)
    monkeypatch.setattr(P, "_fast", lambda *a: False)
    slow = P.encode(x, fmt, kind, like, 256, None)
    eager = P.decode({"m": fast[""], "m_absmax": fast["_absmax"]}, "m", kind, like, fmt)
    monkeypatch.undo()
    assert torch.equal(P.decode({"m": fast[""], "m_absmax": fast["_absmax"]}, "m", kind, like, fmt), eager)
    torch.testing.assert_close(fast["_absmax"], slow["_absmax"], rtol=2e-7, atol=0)
    off = (fast[""].to(torch.int16) - slow[""].to(torch.int16)) if fmt == "int8" else None
    if off is not None:
        assert off.abs().max() <= 1 and (off != 0).float().mean() < 1e-3


@pytest.mark.parametrize("name,precision", [("adamw", "int8"), ("adamw", "int4"), ("adamw", {"exp_avg": "int4", "exp_avg_sq": "param"}),
                                            ("lion", "int8"), ("sgd-sai", "int4"), ("adam-mini", "int8"), ("adam-mini", "int4"),
                                            ("alpha-adam", "int8"), ("alpha-adam", {"exp_avg": "int4", "exp_avg_sq": "param"}),
                                            ("cadamw", "int4"), ("adamw", "bf16"), ("adamw", {"exp_avg": "int8", "exp_avg_sq": "bf16"}),
                                            ("lion", "bf16"), ("sgd-sai", "bf16"), ("alpha-adam", "bf16"),
                                            ("lion+sync", "int8"), ("sgd-sai+async", "int4"), ("lion+async", "bf16"),
                                            ("adam-mini+async", "int8"), ("adam-mini+sync", "int4"), ("adam-mini", "bf16"),
                                            ("adam-mini+async", "bf16")])
def test_the_one_pass_compact_kernel_gives_the_bits_of_decode_step_encode(name, precision, monkeypatch):
    """``native-compact`` (decode, step and encode each block in one pass) against the
    sliced path (the C codec, the C kernel over the whole tensor, the C codec again). The
    masked steps (AlphaAdam, C-AdamW; Adam-mini, Lion and SGD-SaI with ``+mask``) add their mask sums block by block, the whole-tensor
    kernel thread share by thread share: their step sizes may differ in the last bits, so
    there the parameters agree to float32 rounding and the codes but for a few. bf16 state is
    written with the stochastic-rounding bits the sliced path draws."""
    import dataclasses
    import importlib
    from leanopt import _native
    if _native.library() is None:
        pytest.skip("no C kernels on this machine")
    name, _, mask = name.partition("+")
    module = importlib.import_module({"adamw": "leanopt.alpha_adam", "alpha-adam": "leanopt.alpha_adam",
                                      "cadamw": "leanopt.alpha_adam", "lion": "leanopt.lion", "sgd-sai": "leanopt.sgd_sai",
                                      "adam-mini": "leanopt.adam_mini"}[name])
    masked = name in ("alpha-adam", "cadamw") or bool(mask)

    def run(one_pass: bool):
        if not one_pass:
            monkeypatch.setattr(module, "BACKENDS", dataclasses.replace(module.BACKENDS, compact=None))
        model = tiny_model(dim=64, n_heads=4, n_kv_heads=4, mlp_hidden=256)
        opt = leanopt.create_optimizer(name, model, lr=0.5 if name == "sgd-sai" else 1e-3, state_precision=precision,
                                       state_min_size=0, state_block_size=128, **({"mask": mask} if mask else {}))
        for step in range(4):
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.step()
        monkeypatch.undo()
        return model, opt

    (fast, fast_opt), (sliced, sliced_opt) = run(True), run(False)
    assert fast_opt.last_backends == {"native-compact": len(list(fast.parameters()))}
    assert "native-compact" not in sliced_opt.last_backends
    for p, q in zip(fast.parameters(), sliced.parameters()):
        if not masked:
            assert torch.equal(p, q)
        else:
            # (the odd element whose mask a last-bit difference flips moves by its own step)
            assert ((p - q).norm() / q.norm()).item() <= 1e-5
        for key, value in fast_opt.state[p].items():
            if not isinstance(value, torch.Tensor):
                continue
            other = sliced_opt.state[q][key]
            if not masked:
                assert torch.equal(value, other), key
            elif value.dtype == torch.float32:
                assert ((value - other).norm() / other.norm().clamp_min(1e-30)).item() <= 1e-5, key
            else:  # codes: a value near a code's boundary may round to the neighbour
                assert (value != other).float().mean() < 0.01, key


@pytest.mark.parametrize("arch", ["gpt-neox", "gpt2"])
@pytest.mark.parametrize("precision", ["int8", "int4", "bf16"])
def test_adam_mini_fused_qkv_and_column_blocks_step_compact_momentum_in_one_pass(arch, precision, monkeypatch):
    """A fused QKV weight (GPT-NeoX's interleaved ``query_key_value``: per head 16 query rows,
    16 key rows, 16 value neurons) steps its compact momentum in the one-pass C kernel run of
    equal blocks by run; GPT-2's ``Conv1D`` weights (column blocks: ``c_attn``'s heads and
    value neurons, the MLP's neurons) row of codes by row in the column kernel. Both to the
    bits of decode → step → encode (bf16: each run's rounding key moved to its first element,
    so every element draws the bits the whole tensor gives it)."""
    import dataclasses
    import importlib
    import transformers
    from leanopt import _native
    if _native.library() is None:
        pytest.skip("no C kernels on this machine")
    module = importlib.import_module("leanopt.adam_mini")

    def run(one_pass: bool):
        if not one_pass:
            monkeypatch.setattr(module, "BACKENDS", dataclasses.replace(module.BACKENDS, compact=None))
        torch.manual_seed(0)
        if arch == "gpt2":
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=4,
                                                                         n_positions=16))
        else:
            model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
                vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128))
        opt = leanopt.AdamMini(model, lr=1e-3, state_precision=precision, state_min_size=0, state_block_size=32)
        fixed_gradient_steps(list(model.parameters()), opt, 3)
        monkeypatch.undo()
        return model, opt

    (fast, fast_opt), (sliced, sliced_opt) = run(True), run(False)
    assert fast_opt.last_backends == {"native-compact": len(list(fast.parameters()))}, fast_opt.last_backends
    assert "native-compact" not in sliced_opt.last_backends or sliced_opt.last_backends["native-compact"] == 0
    if arch == "gpt2":  # the column layouts are there
        assert any(module._kind(rule.layout) == "columns" for rule in fast_opt._rules.values())
    for p, q in zip(fast.parameters(), sliced.parameters()):
        assert torch.equal(p, q)
        for key, value in fast_opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sliced_opt.state[q][key]), key


@pytest.mark.parametrize("name,precision", [("adamw", "int4"), ("sgd-sai", "int8"), ("lion+async", "bf16")])
def test_compiled_kernels_step_compact_state_as_stored(name, precision, monkeypatch):
    """``compiled-compact`` (CUDA's path, and the CPU's under ``fused=True`` without the C
    kernels): the codes decoded, stepped and encoded inside the compiled kernels, against the
    eager path (the eager codec around the eager step). Rows of 256 elements: whole blocks,
    stepped as rows of one block; of 299: a ragged last block and an odd count of int4 codes;
    of 3: one block a row, of an odd length (both stepped flat). The compiled step differs from the eager one in
    the last bits, so a value at a code's rounding boundary may take its neighbour; bf16
    state is written with the same stochastic-rounding bits."""
    monkeypatch.setenv("LEANOPT_NATIVE", "0")
    name, _, mask = name.partition("+")

    def run(fused: bool):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(33, 299)), nn.Parameter(torch.randn(12, 256)), nn.Parameter(torch.randn(40, 3))]
        opt = leanopt.create_optimizer(name, params, lr=0.5 if name == "sgd-sai" else 1e-3, state_precision=precision,
                                       state_min_size=0, state_block_size=128, fused=fused, **({"mask": mask} if mask else {}))
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            opt.step()
        return params, opt

    (fast, fast_opt), (eager, eager_opt) = run(True), run(False)
    assert fast_opt.last_backends == {"compiled-compact": 3} and eager_opt.last_backends == {"eager": 3}
    for p, q in zip(fast, eager):
        assert ((p - q).norm() / q.norm()).item() <= 1e-5
        for key, value in eager_opt.state[q].items():
            mine = fast_opt.state[p][key]
            if not isinstance(value, torch.Tensor):
                assert mine == value, key
                continue
            assert mine.dtype == value.dtype and mine.shape == value.shape, key
            if value.dtype == torch.float32:
                torch.testing.assert_close(mine, value, rtol=1e-5, atol=1e-7)
            else:
                assert (mine != value).float().mean() < 0.01, key
                if value.dtype == torch.int8:  # a neighbouring code at most
                    assert (mine.to(torch.int16) - value.to(torch.int16)).abs().max() <= 1, key


def test_a_nonfinite_gradient_spoils_its_block_of_int8_state_and_skip_nonfinite_keeps_it(recwarn):
    # docs/algorithms.md §8: the block's scale becomes NaN, so the whole block decodes to NaN
    # (at full precision only the element would); skip_nonfinite leaves the state as it was
    for skip in (False, True):
        w = nn.Parameter(torch.randn(4, 64))
        opt = leanopt.AdamW([w], lr=1e-3, state_precision="int8", state_min_size=0, state_block_size=16,
                            skip_nonfinite=skip)
        w.grad = torch.randn(4, 64)
        opt.step()
        before = P.decode(opt.state[w], "exp_avg", P.MOMENT, w)
        w.grad = torch.randn(4, 64)
        w.grad[1, 20] = float("nan")
        opt.step()
        m = P.decode(opt.state[w], "exp_avg", P.MOMENT, w)
        if skip:
            assert torch.equal(m, before) and opt.nonfinite_skips == 1
        else:
            bad = ~torch.isfinite(m)
            assert bad[1, 16:32].all() and int(bad.sum()) == 16  # that block of 16, and only it


def test_loading_a_state_of_another_block_size_converts_it_with_a_note():
    w = nn.Parameter(torch.randn(8, 512))
    saved = leanopt.AdamW([w], lr=1e-3, state_precision="int8", state_min_size=0, state_block_size=128)
    w.grad = torch.randn(8, 512)
    saved.step()
    opt = leanopt.AdamW([w], lr=1e-3, state_precision="int8", state_min_size=0, state_block_size=256)
    with pytest.warns(UserWarning, match="int8 in blocks of 128 to int8 in blocks of 256"):
        opt.load_state_dict(saved.state_dict())
    assert opt.state[w]["exp_avg_absmax"].shape == (8, 2)
    want = P.decode(saved.state[w], "exp_avg", P.MOMENT, w)
    assert (P.decode(opt.state[w], "exp_avg", P.MOMENT, w) - want).abs().max() <= 0.02 * want.abs().max()
