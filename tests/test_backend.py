"""The router (``leanopt._backend``): ``fused=None`` picks the fastest correct backend per
tensor, ``fused=True`` insists, ``fused=False`` is the eager reference; and the step
records the kernels read are the C kernels' rows, field for field."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import leanopt
from leanopt import _native
from leanopt._optimizer import LeanOptimizer
from leanopt.adam_mini import AdamMiniStep
from leanopt.alpha_adam import AdamStep
from leanopt.lion import LionStep
from leanopt.sgd_sai import SGDStep

from helpers import max_rel_diff, tiny_model

LEANOPT = [n for n in leanopt.list_optimizers() if isinstance(leanopt.optimizer_info(n).factory, type)
           and issubclass(leanopt.optimizer_info(n).factory, LeanOptimizer)]
C_READY = _native.enabled() and _native._compiler() is not None
SRC = Path(leanopt.__file__).parent


def steps(opt, model, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        opt.step()


@pytest.mark.skipif(not C_READY, reason="needs a C compiler for the CPU kernels")
@pytest.mark.parametrize("name", LEANOPT)
def test_the_default_runs_every_float32_cpu_tensor_on_the_c_kernels(name):
    torch.manual_seed(0)
    model = tiny_model()
    opt = leanopt.create_optimizer(name, model, lr=1e-3)
    assert opt.defaults["fused"] is None
    steps(opt, model, n=1)
    assert opt.last_backends == {"native": len(list(model.parameters()))}


@pytest.mark.parametrize("name", ["adam-mini", "alpha-adam", "lion", "sgd-sai"])
def test_the_default_keeps_float64_on_the_eager_path_and_equals_it(name):
    results = []
    for fused in (None, False):
        torch.manual_seed(0)
        model = tiny_model().double()
        opt = leanopt.create_optimizer(name, model, lr=1e-3, fused=fused)
        steps(opt, model)
        assert opt.last_backends == {"eager": len(list(model.parameters()))}
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.skipif(not C_READY, reason="needs a C compiler for the CPU kernels")
def test_a_masked_step_without_a_c_kernel_takes_the_eager_path_on_the_cpu():
    # SGD-SaI's masked C kernel needs a momentum buffer; on the CPU the default does not
    # compile for the case without one (the masked Lion has its kernel)
    n = len(list(tiny_model().parameters()))
    for opt_of, backend in ((lambda m: leanopt.SGDSaI(m.parameters(), momentum=0.0, mask="sync"), "eager"),
                            (lambda m: leanopt.Lion(m.parameters(), mask="async"), "native")):
        model = tiny_model()
        opt = opt_of(model)
        steps(opt, model, n=2)  # (SGD-SaI's first step takes its g-SNR)
        assert opt.last_backends == {backend: n}


def transposed_model():
    model = nn.Linear(6, 4)
    model.register_parameter("wt", nn.Parameter(torch.randn(5, 3).t()))  # a non-contiguous parameter
    assert not model.wt.is_contiguous()
    return model


def test_fused_true_names_a_tensor_no_kernel_takes():
    model = transposed_model()
    opt = leanopt.create_optimizer("alpha-adam", model, fused=True)
    with pytest.raises(ValueError, match=r"fused=True: no fast kernel takes parameter 'wt': it is not contiguous"):
        steps(opt, model, n=1)


@pytest.mark.skipif(not C_READY, reason="needs a C compiler for the CPU kernels")
def test_the_default_splits_a_step_between_the_kernel_and_the_eager_path():
    results = []
    for fused in (None, False):
        torch.manual_seed(0)
        model = transposed_model()
        opt = leanopt.create_optimizer("alpha-adam", model, lr=1e-2, fused=fused)
        steps(opt, model)
        results.append((dict(opt.last_backends), [p.detach().clone() for p in model.parameters()]))
    (split, fast), (eager, ref) = results
    assert split == {"native": 2, "eager": 1} and eager == {"eager": 3}
    assert max_rel_diff(fast, ref) <= 1e-6


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_fused_takes_true_false_or_none(value):
    with pytest.raises(ValueError, match="Invalid fused.*True, False or None"):
        leanopt.AlphaAdam(tiny_model().parameters(), fused=value)


_NO_COMPILER = textwrap.dedent("""
    import warnings, torch, leanopt
    from helpers import tiny_model
    from test_backend import steps
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fused in (None, False):
            torch.manual_seed(0)
            model = tiny_model()
            opt = leanopt.AlphaAdam(model.parameters(), lr=1e-2, fused=fused)
            steps(opt, model)
            out.append((opt.last_backends, [p.detach().clone() for p in model.parameters()]))
    built = [str(w.message) for w in caught if "could not be built" in str(w.message)]
    print(len(built), built[0] if built else "")
    print(out[0][0], out[1][0], all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1])))
""")


def test_without_a_compiler_the_default_warns_once_and_runs_the_eager_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "LEANOPT_NATIVE")}
    env.update(PATH=str(tmp_path / "empty-bin"), LEANOPT_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    done = subprocess.run([sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warned, backends = done.stdout.strip().splitlines()[-2:]
    assert warned.startswith("1 ") and "no C compiler found" in warned and "eager path" in warned
    n = len(list(tiny_model().parameters()))
    assert backends == f"{{'eager': {n}}} {{'eager': {n}}} True"


RECORDS = {"AM": AdamMiniStep, "AD": AdamStep, "LI": LionStep, "SG": SGDStep}


@pytest.mark.parametrize("prefix", RECORDS)
def test_each_step_record_is_its_c_kernels_row(prefix):
    source = (SRC / "csrc" / "cpu_kernels.c").read_text()
    body = re.search(r"enum \{\s*(" + prefix + r"_SIGN[^}]*)\}", source).group(1)
    names = [n.strip() for n in re.sub(r"/\*.*?\*/", "", body, flags=re.S).split(",") if n.strip()]
    assert names[-1] == f"{prefix}_N"
    assert [n.removeprefix(prefix + "_").lower() for n in names[:-1]] == list(RECORDS[prefix]._fields)


def test_a_shard_takes_the_same_path_whatever_its_local_layout(monkeypatch):
    # the ranks' collectives pair up, so the path of a shard whose step crosses the ranks must not
    # depend on this rank's local part: contiguous, a non-contiguous view, or empty, all take the
    # sharded C step (a non-contiguous one through a contiguous copy, written back)
    from leanopt import _backend
    from leanopt._distributed import Piece

    monkeypatch.setattr(_native, "everywhere", lambda: True)  # as agreed by every rank
    seen = []

    def sharded(params, grads, *, pieces):
        seen.append([p.is_contiguous() for p in params])
        for p, g in zip(params, grads):
            p.add_(g)

    backends = _backend.Backends(streams=2, eager=None, compiled=None, sharded=sharded)
    base = torch.zeros(6, 4)
    locals_ = [torch.zeros(4, 6), base.t(), torch.zeros(0, 6)]  # contiguous, a transposed view, an empty shard
    grads = [torch.ones_like(p) for p in locals_]
    piece = Piece(shape=(12, 6), index=(torch.arange(4), None), groups=(object(),))
    plan = _backend._plan(None, [locals_, grads], backends, {}, str, [piece] * 3)
    assert plan[_backend.SHARDED] == [0, 1, 2] and not plan[_backend.EAGER]
    _backend._contiguous(sharded, [locals_, grads], 2, pieces=[piece] * 3)
    assert seen == [[True, True, True]]  # the kernel sees contiguous memory only
    assert torch.equal(base, torch.ones(6, 4)) and torch.equal(locals_[0], torch.ones(4, 6))  # written back in place


def test_shard_caches_stay_bounded():
    # the per-piece caches (lanes, Adam-mini's row plans and flat plans) are keyed by pieces and
    # layouts: a process that keeps building models must not grow them forever
    from leanopt._distributed import remember

    cache: dict = {}
    for i in range(10):
        assert remember(cache, i, str(i), limit=4) == str(i)
        assert len(cache) <= 4 and cache[i] == str(i)
    assert set(cache) == {8, 9}  # emptied when full, then filled again
