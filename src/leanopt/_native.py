"""Hand-written CPU kernels (``csrc/cpu_kernels.c``) for the fused steps, where they beat inductor.

Inductor's code for a row-blocked step (Adam-mini: one second moment per row) recomputes
the row's scalar step (a square root and two divisions) for every vector of 16 elements,
because its stores might alias the loads it would hoist; the masked steps re-read the
gradient in their second pass; and every compiled call pays dynamo's guards. The C kernels
compute each row's step once, take the next row's sum of g² inside the loop that updates
the current row (so a step is one pass over memory), keep the mask in a spare bit instead
of re-reading g, and cover every tensor of a step with one call.

The library is built on first use with the system C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``; ``-O3 -march=native -fopenmp``) into a cache directory (``$LEANOPT_CACHE_DIR``,
else ``~/.cache/leanopt``; a temporary folder where that cannot be written), keyed by the
sources, the compiler, its flags and the CPU, and loaded with :mod:`ctypes`. Where that
fails (no compiler, no OpenMP, not Linux), :func:`library` warns once and returns ``None``,
and the router (:mod:`leanopt._backend`) sends those tensors to the eager path (the
compiled one under ``fused=True``); ``LEANOPT_NATIVE=0`` turns the kernels off.

Each kernel takes one row of doubles per tensor: the family's step record (``AdamStep``,
``LionStep``, ``SGDStep``, ``AdamMiniStep``), whose fields are the C enums' order.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._distributed import is_dtensor

__all__ = ["library", "enabled", "kernel_dtype", "supports", "everywhere", "adam_mini_rows", "adam_mini_masked",
           "elementwise_masked", "row_sq_sums", "adam", "lion", "sgd_sai", "stream", "codec", "stochastic_round",
           "CompactState", "compact_step", "adam_mini_compact",
           "COMPACT_MAX_BLOCK", "COMPACT_MAX_SPAN"]

_SOURCES = ("cpu_kernels.c", "cpu_kernels_body.h", "cpu_codec.h")
# -ffp-contract=off: every operation rounds, as the eager path's tensor operations do
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_MASKS = {"none": 0, "async": 1, "sync": 2}
_GIVEN_COLUMNS = 2  # csrc/cpu_kernels.c: leanopt_adam_mini_masked's "given" for column blocks
_ALPHAS = {"squared": 0, "root": 1, "none": 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """Whether the kernels may be used at all (``LEANOPT_NATIVE=0`` turns them off)."""
    return os.environ.get("LEANOPT_NATIVE", "1") != "0" and sys.platform.startswith("linux")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu_signature() -> str:
    # -march=native: a library built on one CPU must not be loaded on another
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("flags", "model name"))}))
    except OSError:
        return ""


def _cache_dir() -> Path:
    base = os.environ.get("LEANOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "leanopt")
    return Path(base)


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    src_dir = Path(__file__).parent / "csrc"
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256()
    for part in [*(src_dir.joinpath(s).read_bytes() for s in _SOURCES), cc.encode(), version.encode(),
                 " ".join(_FLAGS).encode(), _cpu_signature().encode()]:
        key.update(part)
        key.update(b"\0")
    out_dir = _cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: this user's folder in the temporary directory
        out_dir = Path(tempfile.gettempdir()) / f"leanopt-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"cpu_kernels-{key.hexdigest()[:20]}.so"
    if out.exists():
        return out
    # build beside the target and rename: processes building at once (ranks, test workers)
    # never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(src_dir / "cpu_kernels.c"), "-lm"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; ``None`` where unavailable (warned once)."""
    global _lib, _tried
    if not enabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                lib = ctypes.CDLL(str(_build()))
                ints, ptr = [ctypes.c_int] * 3, ctypes.c_void_p
                for name, argtypes in (("leanopt_adam_mini_rows", ints + [ptr] * 7 + [ctypes.c_int]),
                                       ("leanopt_adam", ints + [ptr] * 6 + ints + [ctypes.c_int, ptr, ptr]),
                                       ("leanopt_row_sq_sums", ints + [ptr] * 4),
                                       ("leanopt_col_sq_sums", ints + [ptr] * 4),
                                       ("leanopt_adam_mini_cols", ints + [ptr] * 7),
                                       ("leanopt_adam_mini_masked", ints + [ptr] * 7 + [ctypes.c_int] * 5 + [ptr] * 2),
                                       ("leanopt_elementwise_masked", ints + [ptr] * 5 + [ctypes.c_int] * 5 + [ptr] * 2),
                                       ("leanopt_elementwise", ints + [ptr] * 5 + [ctypes.c_int]),
                                       ("leanopt_stream", [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ptr, ptr]),
                                       ("leanopt_codec", [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, *[ctypes.c_int64] * 3,
                                                          *[ctypes.c_int] * 3]),
                                       ("leanopt_stochastic_round", [ctypes.c_int, ptr, ptr, ctypes.c_int64, ctypes.c_uint32]),
                                       ("leanopt_compact_step", [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ptr, ctypes.c_int,
                                                                 ptr, ptr, ctypes.c_int, *[ctypes.c_int64] * 3, ptr,
                                                                 *[ctypes.c_int] * 4, ptr]),
                                       ("leanopt_adam_mini_compact", [ctypes.c_int, ptr, ptr, ptr, ptr, ctypes.c_int, ptr,
                                                                      *[ctypes.c_int64] * 4, ptr, *[ctypes.c_int] * 3,
                                                                      ctypes.c_uint32]),
                                       ("leanopt_adam_mini_cols_compact", [ctypes.c_int, ptr, ptr, ptr, ptr, ctypes.c_int, ptr,
                                                                           *[ctypes.c_int64] * 3, ptr, ctypes.c_uint32])):
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = ctypes.c_int, argtypes
                _lib = lib
            except Exception as e:  # no compiler, no OpenMP, read-only cache, ...
                warnings.warn(f"leanopt: the CPU kernels could not be built ({type(e).__name__}: {e}); the optimizers "
                              f"fall back to their eager path (fused=True: the compiled kernels), same results, slower",
                              RuntimeWarning, stacklevel=3)
            _tried = True
    return _lib


def kernel_dtype(*tensors: Tensor) -> bool:
    """Whether these tensors are of a kind the kernels step: CPU, float32 or bfloat16 (all
    alike), not sharded (local parts); their layout aside."""
    dtype = tensors[0].dtype
    return all(t.device.type == "cpu" and t.dtype == dtype and not is_dtensor(t) for t in tensors) and dtype in _DTYPES


def supports(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors as they are: :func:`kernel_dtype`, and
    contiguous."""
    return kernel_dtype(*tensors) and all(t.is_contiguous() for t in tensors)


_everywhere: bool | None = None


def everywhere() -> bool:
    """Whether the kernels load in every process of the default ``torch.distributed`` group
    (agreed once, with one collective, then cached): a shard's step crosses the ranks, and
    all of them must take the same path. Without a process group (or with one that cannot
    reduce CPU tensors), whether they load here."""
    global _everywhere
    if _everywhere is None:
        here = library() is not None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "nccl":
            flag = torch.tensor([int(here)])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            here = bool(flag.item())
        _everywhere = here
    return _everywhere


def _pointers(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _call(name: str, tensors: Sequence[Sequence[Tensor]], written: Sequence[Tensor],
          per_tensor: Sequence[tuple[Callable[[Sequence[Any]], ctypes.Array], Sequence[Any]]], *args: Any) -> None:
    """``name(threads, n, dtype, a pointer array per list of tensors, per-tensor arrays...,
    *args)``, once per dtype among the tensors; ``per_tensor``: (array builder, one value per
    tensor) pairs. ``written``: the tensors the kernel changes."""
    lib = library()
    assert lib is not None
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors[0]):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        lists = [[ts[i] for i in idx] for ts in tensors]
        arrays = [build([values[i] for i in idx]) for build, values in per_tensor]
        rc = getattr(lib, name)(torch.get_num_threads(), len(idx), _DTYPES[dtype], *(_pointers(ts) for ts in lists), *arrays,
                                *args)
        if rc != 0:
            raise RuntimeError(f"{name} failed ({rc})")
    # the kernel wrote through raw pointers: tell autograd, so that a tensor saved for a
    # backward pass and changed here is caught as torch's own in-place ops are
    torch.autograd.graph.increment_version(list(written))


def _doubles(rows: Sequence[Sequence[float]]) -> ctypes.Array:
    flat = [float(x) for row in rows for x in row]
    return (ctypes.c_double * len(flat))(*flat)


def _int64s(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _sizes(params: Sequence[Tensor]) -> tuple[Callable[[Sequence[int]], ctypes.Array], list[int]]:
    return _int64s, [p.numel() for p in params]


def adam_mini_rows(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                   exp_avg_sqs: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int],
                   hypers: Sequence[Sequence[float]], *, given: bool = False) -> None:
    """Adam-mini's step for tensors viewed as ``rows[i] × cols[i]``, one block per row;
    ``hypers[i]``: an ``AdamMiniStep``. ``given``: ``exp_avg_sqs[i]`` hold each row's v of
    this step already (a shard's rows, from the blocks' sums over every rank) and are only
    read; else the kernel sums each row's g² and updates v. The caller checked :func:`supports`."""
    _call("leanopt_adam_mini_rows", (params, grads, exp_avgs, exp_avg_sqs),
          [*params, *exp_avgs] if given else [*params, *exp_avgs, *exp_avg_sqs],
          ((_int64s, rows), (_int64s, cols), (_doubles, hypers)), int(given))


def adam_mini_masked(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                     exp_avg_sqs: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int],
                     hypers: Sequence[Sequence[float]], *, mask: str, alpha: str, count_scale: bool, given: bool = False,
                     columns: bool = False, between: Callable[[Tensor], None] | None = None,
                     whole: Sequence[int] | None = None) -> None:
    """Adam-mini's step with the mask component for tensors viewed as ``rows[i] × cols[i]``,
    one block per row, in two C passes: v and the mask sums, then p and m. ``given``:
    ``exp_avg_sqs[i]`` hold each row's v of this step already (a shard's rows) and are only
    read. ``columns``: column blocks, ``exp_avg_sqs[i]`` holding each column's block v of this
    step (only read). ``between``, ``whole``: as :func:`_two_passes`. The caller checked
    :func:`supports`."""
    _two_passes(*_adam_mini_masked_call(params, grads, exp_avgs, exp_avg_sqs, rows, cols, hypers, given, columns), mask,
                alpha, count_scale, between, whole)


def adam_mini_masked_pass(phase: int, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                          exp_avg_sqs: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int],
                          hypers: Sequence[Sequence[float]], *, mask: str, alpha: str, count_scale: bool, given: bool,
                          sums: Tensor, whole: Sequence[int] | None = None, columns: bool = False) -> None:
    """One pass of :func:`adam_mini_masked`, for callers that run their own passes between the
    two (a shard's blocks held whole and split ones): phase 1 writes each tensor's mask sums to
    ``sums`` (a ``(len(params), 3)`` float64 tensor) and, unless ``given`` (or ``columns``),
    moves v; phase 2 steps p and m from ``sums`` (``whole[i]``: tensor ``i``'s whole size). One
    dtype."""
    assert sums.dtype == torch.float64 and sums.is_contiguous() and tuple(sums.shape) == (len(params), 3)
    name, tensors, written, per_tensor, lead = _adam_mini_masked_call(params, grads, exp_avgs, exp_avg_sqs, rows, cols,
                                                                      hypers, given, columns)
    _masked_pass(name, tensors, written[phase - 1], per_tensor, lead, mask, alpha, count_scale, phase, sums, whole)


def _adam_mini_masked_call(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                           exp_avg_sqs: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int],
                           hypers: Sequence[Sequence[float]], given: bool, columns: bool = False) -> tuple:
    """``leanopt_adam_mini_masked``'s arguments for :func:`_two_passes`: name, tensors, what
    each phase writes (v only when the kernel moves it), per-tensor arrays, lead arguments."""
    return ("leanopt_adam_mini_masked", (params, grads, exp_avgs, exp_avg_sqs),
            ([] if given or columns else list(exp_avg_sqs), [*params, *exp_avgs]),
            ((_int64s, rows), (_int64s, cols), (_doubles, hypers)), (_GIVEN_COLUMNS if columns else int(given),))


def elementwise_masked(family: str, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                       hypers: Sequence[Sequence[float]], *, mask: str, alpha: str, count_scale: bool,
                       between: Callable[[Tensor], None] | None = None, whole: Sequence[int] | None = None) -> None:
    """Lion's (``family="lion"``; ``hypers[i]`` a ``LionStep``) or SGD-SaI's with a momentum
    buffer (``"sgd_sai"``; an ``SGDStep`` with its scale) step with the mask component, in two
    C passes: the mask sums, then p and m. ``between``, ``whole``: as :func:`_two_passes`."""
    _two_passes("leanopt_elementwise_masked", (params, grads, exp_avgs), ([], [*params, *exp_avgs]),
                (_sizes(params), (_doubles, hypers)), (_FAMILIES[family] - 1,), mask, alpha, count_scale, between, whole)


def _two_passes(name: str, tensors: Sequence[Sequence[Tensor]], written: tuple[list[Tensor], list[Tensor]],
                per_tensor: Sequence[Any], lead: tuple[int, ...], mask: str, alpha: str, count_scale: bool,
                between: Callable[[Tensor], None] | None, whole: Sequence[int] | None,
                on_error: Callable[[], None] | None = None) -> None:
    """A masked step in two C calls: ``name(..., *lead, mask, alpha, count_scale, phase,
    sums, whole)`` with phase 1 (the ``(len, 3)`` float64 mask sums, writing ``written[0]``),
    then phase 2 (the step from them, writing ``written[1]``). Shards: ``between(sums)``
    reduces the sums over the ranks in place between the two (should it raise, ``on_error()``
    first), and ``whole[i]`` is tensor ``i``'s whole size. One dtype per call."""
    sums = torch.zeros(len(tensors[0]), 3, dtype=torch.float64)
    for phase, w in ((1, written[0]), (2, written[1])):
        if phase == 2 and between is not None:
            try:
                between(sums)
            except BaseException:
                if on_error is not None:
                    on_error()
                raise
        _masked_pass(name, tensors, w, per_tensor, lead, mask, alpha, count_scale, phase, sums, whole)


def _masked_pass(name: str, tensors: Sequence[Sequence[Tensor]], written: list[Tensor], per_tensor: Sequence[Any],
                 lead: tuple[int, ...], mask: str, alpha: str, count_scale: bool, phase: int, sums: Tensor,
                 whole: Sequence[int] | None) -> None:
    """Phase ``phase`` of a two-pass kernel (:func:`_two_passes`), with its mask sums in ``sums``."""
    if len({t.dtype for t in tensors[0]}) > 1:
        raise ValueError(f"{name}: one dtype per call")  # sums are indexed by tensor within one call
    sizes = _int64s([t.numel() for t in tensors[0]] if whole is None else list(whole))
    _call(name, tensors, written, per_tensor, *lead, _MASKS[mask], _ALPHAS[alpha], int(count_scale), phase, sums.data_ptr(),
          sizes)


def row_sq_sums(grads: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int]) -> list[Tensor]:
    """The sum of g² of every row of each tensor viewed as ``rows[i] × cols[i]``, as float64
    tensors (non-finite squares left out, as :func:`adam_mini_rows` sums them): a shard's part
    of its Adam-mini blocks' sums. One call for every tensor; the caller checked :func:`supports`."""
    out = [torch.empty(r, dtype=torch.float64) for r in rows]
    _call("leanopt_row_sq_sums", (grads,), [], ((_int64s, rows), (_int64s, cols), (_pointers, out)))
    return out


def col_sq_sums(grads: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int]) -> list[Tensor]:
    """The sum of g² of every column of each tensor viewed as ``rows[i] × cols[i]``, as
    float64 tensors (non-finite squares left out): Adam-mini's column blocks (a shard's
    part of them). One call for every tensor; the caller checked :func:`supports`."""
    out = [torch.empty(c, dtype=torch.float64) for c in cols]
    _call("leanopt_col_sq_sums", (grads,), [], ((_int64s, rows), (_int64s, cols), (_pointers, out)))
    return out


def adam_mini_cols(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                   lane_v: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int],
                   hypers: Sequence[Sequence[float]]) -> None:
    """Adam-mini's step for tensors viewed as ``rows[i] × cols[i]`` whose blocks are runs of
    columns, from ``lane_v[i]``: each column's block v of this step (from :func:`col_sq_sums`),
    only read; ``hypers[i]``: an ``AdamMiniStep``. The caller checked :func:`supports`."""
    _call("leanopt_adam_mini_cols", (params, grads, exp_avgs, lane_v), [*params, *exp_avgs],
          ((_int64s, rows), (_int64s, cols), (_doubles, hypers)))


def adam(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
         hypers: Sequence[Sequence[float]], *, mask: str, alpha: str, count_scale: bool,
         between: Callable[[Tensor], None] | None = None, whole: Sequence[int] | None = None) -> None:
    """The Adam family's step (:func:`leanopt.alpha_adam.alpha_adam`); ``hypers[i]``: an
    ``AdamStep``. With ``mask="none"`` and ``count_scale``, the caller puts the count
    scale ``n/(n+1)`` into ``lr``. The caller checked :func:`supports`.

    Shards of a masked step (their mask sums cross the ranks): ``between(sums)`` gets the
    ``(len(params), 3)`` float64 sums of pass 1 to reduce in place, and ``whole[i]`` is
    tensor ``i``'s whole size; pass 2 then steps from them. Should ``between`` raise, the
    mask bits pass 1 left in v are cleared first (m and v have moved, p has not)."""
    if between is None or mask == "none":
        _call("leanopt_adam", (params, grads, exp_avgs, exp_avg_sqs), [*params, *exp_avgs, *exp_avg_sqs],
              (_sizes(params), (_doubles, hypers)), _MASKS[mask], _ALPHAS[alpha], int(count_scale), 0, None, None)
        return

    def clear_mask_bits() -> None:  # v >= 0: its sign bits held φ between the passes
        torch._foreach_abs_(list(exp_avg_sqs))

    _two_passes("leanopt_adam", (params, grads, exp_avgs, exp_avg_sqs),
                ([*exp_avgs, *exp_avg_sqs], [*params, *exp_avgs, *exp_avg_sqs]), (_sizes(params), (_doubles, hypers)), (),
                mask, alpha, count_scale, between, whole, clear_mask_bits)


def lion(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
         hypers: Sequence[Sequence[float]]) -> None:
    """Lion's step without a mask (:func:`leanopt.lion.lion`); ``hypers[i]``: a ``LionStep``."""
    _call("leanopt_elementwise", (params, grads, exp_avgs), [*params, *exp_avgs], (_sizes(params), (_doubles, hypers)), 0)


def sgd_sai(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor | None],
            hypers: Sequence[Sequence[float]]) -> None:
    """SGD-SaI's step without a mask (:func:`leanopt.sgd_sai.sgd_sai`); ``hypers[i]``: an
    ``SGDStep`` (``has_m`` 0 where ``buffers[i]`` is None: the kernel reads the
    gradient in its place)."""
    _call("leanopt_elementwise", (params, grads, [g if b is None else b for g, b in zip(grads, buffers)]),
          [*params, *(b for b in buffers if b is not None)], (_sizes(params), (_doubles, hypers)), 1)


def stream(reads: Sequence[Tensor], writes: Sequence[Tensor]) -> None:
    """One pass over equal-size contiguous float32 CPU tensors that reads ``reads`` (1-4) and
    writes ``writes`` (0-3; in place where a tensor is in both), with next to no arithmetic:
    a memory-traffic probe for ``leanopt speed --patterns``."""
    lib = library()
    assert lib is not None
    n = reads[0].numel()
    if not all(t.numel() == n and t.dtype == torch.float32 and t.is_contiguous() for t in (*reads, *writes)):
        raise ValueError("stream: equal-size contiguous float32 tensors")
    rc = lib.leanopt_stream(torch.get_num_threads(), n, len(reads), len(writes), _pointers(reads), _pointers(writes or reads))
    if rc != 0:
        raise ValueError(f"stream: {len(reads)} reads and {len(writes)} writes; at most 4 and 3")


def codec(encode: bool, values: Tensor, codes: Tensor, scales: Tensor, block: int, second: bool, packed: bool,
          top: int) -> None:
    """Blockwise codes of compact state (:mod:`leanopt.precision`) in one pass: ``encode``
    float32 ``values`` (rows along the last dimension) into ``codes`` and ``scales``, or
    decode them into ``values``. All contiguous CPU tensors of the shapes precision.py
    gives; the caller checked :func:`library`."""
    lib = library()
    assert lib is not None
    last = values.shape[-1] if values.dim() else 1
    rc = lib.leanopt_codec(torch.get_num_threads(), int(encode), values.data_ptr(), codes.data_ptr(), scales.data_ptr(),
                           values.numel() // max(last, 1), last, block, int(second), int(packed), top)
    if rc != 0:
        raise ValueError(f"codec: bad arguments (block {block}, rows of {last})")
    torch.autograd.graph.increment_version([codes, scales] if encode else [values])


def stochastic_round(out: Tensor, values: Tensor, key: int) -> None:
    """``out`` (bfloat16) ← float32 ``values`` rounded stochastically with the bits of
    :func:`leanopt.precision.rounding_bits` (one pass; contiguous CPU tensors, checked by
    the caller)."""
    lib = library()
    assert lib is not None
    lib.leanopt_stochastic_round(torch.get_num_threads(), values.data_ptr(), out.data_ptr(), values.numel(), key)
    torch.autograd.graph.increment_version([out])


COMPACT_MAX_BLOCK = 4096  # csrc/cpu_codec.h: the blocks a one-pass compact step decodes on its stack
COMPACT_MAX_SPAN = 1 << 20  # ... and the spans (elements) of Adam-mini's, decoded into a buffer per thread
_FAMILIES = {"adam": 0, "lion": 1, "sgd_sai": 2}


class CompactState(NamedTuple):
    """A state tensor in int8/int4 codes or bfloat16, as a one-pass compact step reads and
    writes it."""

    codes: Tensor  # the codes, or the bfloat16 tensor
    scales: Tensor | None  # the block scales (None for bfloat16)
    fmt: str  # "int8", "int4" or "bf16"
    block: int  # the codes' block (0 for bfloat16: any)
    key: int = 0  # bfloat16: this step's stochastic-rounding key (leanopt.precision.rounding_key)


_FORMATS = {"int8": 1, "int4": 2, "bf16": 3}
_BF16_BLOCK = 1024  # the blocks a one-pass step takes bfloat16 state in, when no coded state sets them


def compact_step(family: str, p: Tensor, g: Tensor, m: Tensor | CompactState, v: Tensor | CompactState | None,
                 hyper: Sequence[float], scaled: bool = False, *, mask: str = "none", alpha: str = "none",
                 count_scale: bool = False) -> None:
    """One step of ``family`` ("adam", "lion", "sgd_sai") over one float32 CPU tensor whose
    states are float32 tensors or :class:`CompactState` codes: each block decoded, stepped
    and encoded again in one pass (``csrc/cpu_codec.h``); with the mask component (or the
    count scale) in two (the mask's sums, then the step: only the second writes). ``hyper``:
    the family's step record, as for :func:`adam`, :func:`lion`, :func:`sgd_sai`."""
    lib = library()
    assert lib is not None
    last = p.shape[-1] if p.dim() else 1

    def parts(s: Tensor | CompactState | None) -> tuple[int | None, int | None, int, int | None]:
        if s is None or not isinstance(s, CompactState):  # absent, or a float32 tensor stepped in place
            return (None if s is None else s.data_ptr()), None, 0, None
        return s.codes.data_ptr(), None if s.scales is None else s.scales.data_ptr(), _FORMATS[s.fmt], s.block or None

    (m_ptr, ms_ptr, fm, block), (v_ptr, vs_ptr, fv, v_block) = parts(m), parts(v)
    if block is not None and v_block is not None and block != v_block:
        raise ValueError(f"compact_step: the states' blocks differ ({block} and {v_block})")
    block = block or v_block or min(last, _BF16_BLOCK)
    keys = (ctypes.c_uint32 * 2)(*(s.key if isinstance(s, CompactState) else 0 for s in (m, v)))
    rc = lib.leanopt_compact_step(torch.get_num_threads(), _FAMILIES[family], p.data_ptr(), g.data_ptr(), m_ptr, ms_ptr, fm,
                                  v_ptr, vs_ptr, fv, p.numel() // max(last, 1), last, block, _doubles([hyper]),
                                  int(scaled), _MASKS[mask], _ALPHAS[alpha], int(count_scale), keys)
    if rc != 0:
        raise ValueError(f"compact_step: bad arguments ({family}, block {block}, rows of {last})")
    torch.autograd.graph.increment_version([p] + [s.codes if isinstance(s, CompactState) else s for s in (m, v) if s is not None])


def adam_mini_compact(p: Tensor, g: Tensor, m: CompactState, v: Tensor, blocks: int, count: int,
                      hyper: Sequence[float], *, mask: str = "none", alpha: str = "none", count_scale: bool = False) -> None:
    """Adam-mini's step over one float32 CPU tensor of ``blocks`` contiguous blocks of
    ``count`` elements (a row layout, as :func:`adam_mini_rows`) whose momentum is compact
    (int8, int4 or bf16 codes): spans of ``max(count, rows of codes)`` elements decoded,
    stepped and encoded again in one pass; with the mask component (or the count scale), two
    (v and the mask's sums, then the step), as :func:`adam_mini_masked`. The caller checked
    that one of the two divides the other."""
    lib = library()
    assert lib is not None
    last = p.shape[-1] if p.dim() else 1
    rc = lib.leanopt_adam_mini_compact(torch.get_num_threads(), p.data_ptr(), g.data_ptr(), m.codes.data_ptr(),
                                       None if m.scales is None else m.scales.data_ptr(), _FORMATS[m.fmt], v.data_ptr(),
                                       blocks, count, last, m.block or min(last, _BF16_BLOCK), _doubles([hyper]), _MASKS[mask],
                                       _ALPHAS[alpha], int(count_scale), m.key)
    if rc != 0:
        raise ValueError(f"adam_mini_compact: {'no memory' if rc == 2 else 'bad arguments'} ({blocks} x {count}, rows of {last})")
    torch.autograd.graph.increment_version([p, m.codes, v])


def adam_mini_cols_compact(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[CompactState],
                           lane_v: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int],
                           hypers: Sequence[Sequence[float]]) -> None:
    """:func:`adam_mini_cols` for float32 CPU tensors whose momentum is compact (int8, int4 or
    bf16 codes) in rows of the same ``cols[i]`` elements (the tensor's last dimension): each
    row decoded, stepped and encoded again in one pass. ``lane_v[i]``: float32, one a column."""
    lib = library()
    assert lib is not None
    for p, g, m, v, r, c, hyper in zip(params, grads, exp_avgs, lane_v, rows, cols, hypers, strict=True):
        v = v.contiguous()
        rc = lib.leanopt_adam_mini_cols_compact(torch.get_num_threads(), p.data_ptr(), g.data_ptr(), m.codes.data_ptr(),
                                                None if m.scales is None else m.scales.data_ptr(), _FORMATS[m.fmt],
                                                v.data_ptr(), r, c, m.block or min(c, _BF16_BLOCK), _doubles([hyper]), m.key)
        if rc != 0:
            raise ValueError(f"adam_mini_cols_compact: {'no memory' if rc == 2 else 'bad arguments'} ({r} x {c})")
        torch.autograd.graph.increment_version([p, m.codes])
