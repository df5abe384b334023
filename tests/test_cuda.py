"""The GPU path: on CUDA every leanopt optimizer's default (the compiled kernels) against its
eager reference, float32 and bfloat16, and over compact state. Skipped without a GPU; ``scripts/gpu-check`` runs it
(also without pytest: ``python tests/test_cuda.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import leanopt  # noqa: E402
from helpers import max_rel_diff, tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# every optimizer of the registry that leanopt implements, with the variants whose kernels differ
CASES = [("adam-mini", {}), ("adam-mini", {"mask": "async"}), ("sgd-sai", {}), ("sgd-sai", {"mask": "sync"}),
         ("alpha-adam", {}), ("cadamw", {}), ("lion", {}), ("lion", {"mask": "async"}), ("adamw-pma", {}),
         ("lion-pma", {})]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # bf16: the kernels round once, the eager path per operation
STEPS = 10


def trajectory(name: str, kw: dict, fused: bool | None, dtype: torch.dtype):
    torch.manual_seed(0)
    model = tiny_model(dtype=dtype).cuda()
    opt = leanopt.create_optimizer(name, model, lr=1e-3, weight_decay=0.1, fused=fused, **kw)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(STEPS):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
        opt.step()
    return opt, [p.detach().float().cpu() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n}{'-' + kw['mask'] if kw else ''}" for n, kw in CASES])
def test_the_cuda_default_is_the_compiled_kernel_and_equals_eager(name, kw, dtype):
    opt, fast = trajectory(name, kw, None, dtype)
    assert set(opt.last_backends) == {"compiled"}, opt.last_backends
    _, ref = trajectory(name, kw, False, dtype)
    assert all(torch.isfinite(p).all() for p in fast)
    assert max_rel_diff(fast, ref) <= TOL[dtype]


# compact state (int8/int4/bf16) of float32 parameters: the compiled kernels decode and encode it
# (compiled-compact); Adam-mini's compiled step reads decoded copies (the compiled codec around it)
COMPACT = [("adamw", "int8"), ("adamw", "int4"), ("alpha-adam", "int4"), ("lion", "bf16"), ("sgd-sai", "int8"),
           ("lion", "int4"), ("adam-mini", "int8")]


@pytest.mark.parametrize("name, precision", COMPACT, ids=[f"{n}-{p}" for n, p in COMPACT])
def test_the_cuda_default_steps_compact_state_in_the_compiled_kernels(name, precision):
    kw = {"state_precision": precision, "state_min_size": 0, "state_block_size": 64}
    opt, fast = trajectory(name, kw, None, torch.float32)
    assert set(opt.last_backends) == {"compiled" if name == "adam-mini" else "compiled-compact"}, opt.last_backends
    _, ref = trajectory(name, kw, False, torch.float32)
    assert all(torch.isfinite(p).all() for p in fast)
    # a value at a code's rounding boundary may take the neighbouring code (the compiled and
    # the eager step differ in the last bits), and then its element moves a little otherwise
    assert max_rel_diff(fast, ref) <= 1e-4


def _main() -> int:
    """Run the cases without pytest (the GPU machine may not have it); exit 1 on a failure."""
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 0
    failed = 0
    for dtype in TOL:
        for name, kw in CASES:
            label = f"{name} {kw or ''} {str(dtype).removeprefix('torch.')}"
            try:
                test_the_cuda_default_is_the_compiled_kernel_and_equals_eager(name, kw, dtype)
                print(f"ok    {label}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every case
                failed += 1
                print(f"FAIL  {label}: {type(e).__name__}: {e}", flush=True)
    for name, precision in COMPACT:
        try:
            test_the_cuda_default_steps_compact_state_in_the_compiled_kernels(name, precision)
            print(f"ok    {name} state_precision={precision}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case
            failed += 1
            print(f"FAIL  {name} state_precision={precision}: {type(e).__name__}: {e}", flush=True)
    print(f"{failed} failed of {len(TOL) * len(CASES) + len(COMPACT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
