"""Adam-mini's step on the layouts the C kernels took late, against the path they took before:

    .venv/bin/python scripts/adam_mini_layout_speed.py [param|int8|int4|bf16] [gpt2] [async]

Default: fused QKV weights (torch's nn.MultiheadAttention ``in_proj_weight``: query and key
heads, then value neurons, so blocks of unequal size) by the C kernel over each run of equal
blocks, against the eager path (with a state precision: the compact momentum's one-pass C step
against decode -> step -> encode), in four ``nn.TransformerEncoderLayer(768, 12 heads, 3072)``
(28M parameters, 7M of them fused QKV). ``gpt2``: GPT-2's ``Conv1D`` weights (column blocks)
with compact momentum, by the column kernel row of codes by row, against decode -> step ->
encode, in a four-layer 768-wide transformers GPT-2 (28M parameters in Conv1D weights);
``gpt2 async``: those with the asynchronous mask, whose column blocks stepped eagerly before.
Float32, 2 threads; both arms step in turn in one process, 7 rounds after a warm-up, medians
and the ratio to the C kernel."""

from __future__ import annotations

import dataclasses
import importlib
import statistics
import sys
import time
import warnings

import torch

import leanopt

am = importlib.import_module("leanopt.adam_mini")  # (leanopt.adam_mini is also the functional core's name)


def arm(runs_in_c: bool, precision: str, gpt2: bool, mask: str):
    torch.manual_seed(0)
    if gpt2:
        import transformers

        model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=64, n_embd=768, n_layer=4, n_head=12))
    else:
        model = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True) for _ in range(4)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = leanopt.AdamMini(model, lr=1e-3, state_precision=precision, mask=mask)
    takes, compact_takes = am.BACKENDS.native_takes, am.BACKENDS.compact_takes
    late = "columns" if gpt2 else "rows"  # the layout the C kernels took late
    native_before = takes if gpt2 and mask == "none" else lambda row, o: am._kind(row[4]) != late and takes(row, o)
    before = dataclasses.replace(am.BACKENDS, native_takes=native_before,
                                 compact_takes=lambda row, o: am._kind(row[4]) != late and compact_takes(row, o))

    def step() -> tuple[float, dict[str, int]]:
        saved = am.BACKENDS
        am.BACKENDS = saved if runs_in_c else before
        try:
            start = time.perf_counter()
            opt.step()
            return time.perf_counter() - start, dict(opt.last_backends)
        finally:
            am.BACKENDS = saved
    return step


def main() -> None:
    torch.set_num_threads(2)
    precision = sys.argv[1] if len(sys.argv) > 1 else "param"
    gpt2, mask = "gpt2" in sys.argv[2:], "async" if "async" in sys.argv[2:] else "none"
    arms = {"C kernel": arm(True, precision, gpt2, mask), "before": arm(False, precision, gpt2, mask)}
    for name, step in arms.items():
        print(f"{name}: backends {step()[1]}")
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(7):
        for k, step in arms.items():
            times[k].append(step()[0])
    base = statistics.median(times["C kernel"])
    for k, v in times.items():
        print(f"{k}: {statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / base:.2f}x)")


if __name__ == "__main__":
    main()
