"""Low-precision optimizer state and stochastic rounding, shared by every leanopt optimizer.

The math and the choices: ``docs/algorithms.md`` §8. Each per-element state tensor (a first
moment ``m``, a second moment ``v``, a momentum buffer) is *stored* in one of four formats
and *stepped* as a float working tensor::

    "param"  the parameter's dtype, as torch.optim (the default: no conversion at all)
    "bf16"   bfloat16, written with stochastic rounding (E[stored] = value, so EMA updates
             smaller than half a bf16 step are kept on average instead of rounded away)
    "int8"   blockwise absmax codes: blocks of ``block_size`` consecutive elements along
             the last dimension (a ragged last block), one float32 absmax per block;
             momenta signed, x = a·sign(c)·(|c|/127)²; second moments in the square-root
             domain, sqrt(v) = a·(c/255)², a positive v never stored as 0
    "int4"   momenta only: x = a·sign(c)·(|c|/7)², two codes per byte

The arguments, the same on every leanopt optimizer and per param group:

* ``state_precision``: one of the formats above (default ``"param"``), or a dict by state
  name (``{"exp_avg": "int4", "exp_avg_sq": "int8"}``); ``"int4"`` stores int4 momenta and
  int8 second moments (four bits cannot hold the range of g²).
* ``state_block_size``: elements per int8/int4 block, a power of two >= 2 (default 256).
* ``state_min_size``: tensors with fewer elements keep the parameter's precision under
  int8 and int4 (default 4096).
* ``stochastic_rounding``: bfloat16 parameters only; the step runs in float32 and the
  new parameter is rounded to bfloat16 stochastically, so pure-bf16 weights keep learning.

The square map (a power-2 companding) gives small entries of a block finer steps than a
linear map: the relative error of an entry a hundredth of its block's max is ~10x smaller
(``tests/test_precision.py`` measures it). Blocks run along the last dimension so that a
tensor sharded along its first one (FSDP2) never splits a block.

Tensors smaller than ``min_size`` elements keep the parameter's precision under int8 and
int4, as torchao and bitsandbytes do: their state is a negligible share of the bytes.

Stochastic rounding draws its bits from a counter-based hash of each element's index and
a key made of the group's seed, the group's rounding-step counter and the tensor's
position (both kept in the param group, so a resumed run draws the same bits as an
uninterrupted one); the C kernel and the eager code draw the same bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from . import _native
from ._compile import Kernel
from ._distributed import is_dtensor, local

__all__ = ["PRECISIONS", "MOMENT", "SECOND", "precision_checks", "precision_defaults", "stored_format", "format_of",
           "zeros", "decode", "encode", "stored_keys", "stochastic_round_", "rounding_key", "rounding_bits",
           "bytes_per_element"]

PRECISIONS = ("param", "bf16", "int8", "int4")
MOMENT, SECOND = "moment", "second"  # the two kinds of per-element state
SCALE_SUFFIX = "_absmax"  # the state key of a quantized tensor's block scales: key + suffix

COMPACT_DTYPES = (torch.bfloat16, torch.int8, torch.uint8)  # what stored state may be, besides the parameter's dtype
_CODE_MAX = {("int8", MOMENT): 127, ("int8", SECOND): 255, ("int4", MOMENT): 7}


# -- arguments ---------------------------------------------------------------------------


class _PrecisionCheck:
    def check(self, name: str, value: Any) -> None:
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for key, prec in items:
            if key is not None and not isinstance(key, str):
                raise ValueError(f"Invalid {name}: keys must be state names (str), got {key!r}")
            if prec not in PRECISIONS:
                where = f"[{key!r}]" if key is not None else ""
                raise ValueError(f"Invalid {name}{where}: {prec!r}; {name} must be one of "
                                 f"{', '.join(map(repr, PRECISIONS))} (or a dict of them by state name)")


class _BlockSizeCheck:
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 2 or value & (value - 1):
            raise ValueError(f"Invalid {name}: {value!r}; {name} must be a power of two >= 2 (e.g. 256)")


class _MinSizeCheck:
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r}; {name} must be an int >= 0 (elements)")


class _RoundingCheck:
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r}; {name} must be True or False")


def precision_checks() -> dict[str, Any]:
    """Hyperparameter checks for the precision arguments, to merge into ``_checks``."""
    return {"state_precision": _PrecisionCheck(), "state_block_size": _BlockSizeCheck(),
            "state_min_size": _MinSizeCheck(), "stochastic_rounding": _RoundingCheck()}


def precision_defaults(state_precision: str | Mapping[str, str], state_block_size: int, state_min_size: int,
                       stochastic_rounding: bool) -> dict[str, Any]:
    """The group entries of the precision arguments (a dict precision copied, so that a
    group never shares the caller's dict)."""
    prec = dict(state_precision) if isinstance(state_precision, Mapping) else state_precision
    return {"state_precision": prec, "state_block_size": state_block_size, "state_min_size": state_min_size,
            "stochastic_rounding": stochastic_rounding}


def check_state_keys(owner: str, precision: Any, kinds: Mapping[str, str]) -> None:
    """A dict precision names only this optimizer's per-element states, and never int4 for
    a second moment (four bits cannot hold the range of g²): ``ValueError`` naming it."""
    if not isinstance(precision, Mapping):
        return
    for key, prec in precision.items():
        if key not in kinds:
            raise ValueError(f"{owner}: state_precision names {key!r}, which is not a per-element state of {owner} "
                             f"(those are: {', '.join(kinds)})")
        if prec == "int4" and kinds[key] == SECOND:
            raise ValueError(f"{owner}: state_precision[{key!r}] = 'int4': int4 is for momenta only; a second moment "
                             "needs 'int8' or 'bf16'")


# -- formats -----------------------------------------------------------------------------


def stored_format(group: Mapping[str, Any], key: str, kind: str, p: Tensor) -> str:
    """The format state ``key`` (of ``kind``) of parameter ``p`` is stored in, for ``group``.

    The string ``"int4"`` means int4 momenta and int8 second moments; bfloat16 state of a
    bfloat16 parameter under ``stochastic_rounding`` is written with stochastic rounding too."""
    prec = group.get("state_precision", "param")
    prec = prec.get(key, "param") if isinstance(prec, Mapping) else prec
    if prec == "int4" and kind == SECOND:
        prec = "int8"
    if prec in ("int8", "int4") and (p.numel() < max(group.get("state_min_size", 0), 1)
                                     or blocks_straddle(p, group.get("state_block_size", 256))):
        prec = "param"
    if prec == "param" and p.dtype == torch.bfloat16 and group.get("stochastic_rounding"):
        prec = "bf16"
    return prec


def blocks_straddle(p: Tensor, block: int) -> bool:
    """Whether blocks of ``block`` elements along the last dimension of a sharded (DTensor)
    ``p`` would straddle two ranks. They do not when no placement splits that dimension
    (FSDP2's ``Shard(0)`` of a matrix), or when it is split evenly into whole blocks
    (tensor parallelism's row-wise ``Shard(1)`` of 4096 columns over 8 ranks, blocks of
    256). Otherwise (a sharded vector, an uneven split) the state keeps the parameter's
    precision, so that the blocks, and the checkpoint, are the same on every layout that
    quantizes the tensor."""
    if not is_dtensor(p):
        return False
    last, cols = max(p.dim() - 1, 0), p.shape[-1] if p.dim() else 1
    for size, pl in zip(p.device_mesh.shape, p.placements):
        if pl.is_shard() and pl.dim % max(p.dim(), 1) == last:
            if type(pl).__name__ != "Shard" or p.dim() < 2 or cols % size or (cols // size) % block:
                return True
            cols //= size
    return False


def same_storage(a: str, b: str, p: Tensor) -> bool:
    """Whether formats ``a`` and ``b`` store the same tensor (bf16 *is* a bf16 parameter's dtype)."""
    return a == b or ({a, b} == {"param", "bf16"} and p.dtype == torch.bfloat16)


def stored_keys(key: str, fmt: str) -> tuple[str, ...]:
    """The state entries that hold ``key`` in format ``fmt``."""
    return (key, key + SCALE_SUFFIX) if fmt in ("int8", "int4") else (key,)


def format_of(state: Mapping[str, Any], key: str, kind: str, p: Tensor) -> str:
    """The format ``state[key]`` is in now (what a loaded checkpoint holds)."""
    value = state[key]
    if key + SCALE_SUFFIX in state:
        return "int8" if value.dtype == torch.int8 or kind == SECOND else "int4"
    return "bf16" if value.dtype == torch.bfloat16 and p.dtype != torch.bfloat16 else "param"


def working_dtype(p: Tensor) -> torch.dtype:
    """The dtype a compact state is stepped in: the parameter's, at least float32."""
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def _n_blocks(last: int, block: int) -> int:
    return -(-last // block)


def _shape(p: Tensor) -> tuple[int, ...]:
    return tuple(p.shape) if p.dim() else (1,)


def code_shape(p: Tensor, fmt: str) -> tuple[int, ...]:
    *lead, last = _shape(p)
    return (*lead, -(-last // 2)) if fmt == "int4" else (*lead, last)


def scale_shape(p: Tensor, block: int) -> tuple[int, ...]:
    *lead, last = _shape(p)
    return (*lead, _n_blocks(last, block))


def zeros(fmt: str, kind: str, p: Tensor, block: int) -> dict[str, Tensor]:
    """Fresh (zero) stored entries of one state, by suffix (``""`` the codes or tensor)."""
    if fmt == "param":
        return {"": torch.zeros_like(p, memory_format=torch.contiguous_format)}
    if fmt == "bf16":
        return {"": torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)}
    code_dtype = torch.int8 if (fmt, kind) == ("int8", MOMENT) else torch.uint8
    codes = torch.zeros(code_shape(p, fmt), dtype=code_dtype, device=p.device)
    if fmt == "int4":
        codes.fill_(0x88)  # both nibbles hold code 0 (stored with an offset of 8)
    return {"": codes, SCALE_SUFFIX: torch.zeros(scale_shape(p, block), dtype=torch.float32, device=p.device)}


def _block_of(last: int, n_blocks: int, key: str) -> int:
    """The block size stored codes were made with, from their number of blocks: for powers
    of two it is unique whenever there are 2 or more blocks (one block: the whole row), so a
    state saved with another ``state_block_size`` still decodes."""
    if n_blocks <= 1:
        return max(last, 1)
    block = 1 << math.ceil(math.log2(-(-last // n_blocks)))
    if _n_blocks(last, block) != n_blocks:
        raise ValueError(f"state {key!r}: {n_blocks} block scales do not fit rows of {last} elements")
    return block


def block_of(state: Mapping[str, Any], key: str, p: Tensor) -> int:
    """The block size of ``p``'s int8/int4 state ``key``, from the shapes of its codes and scales."""
    return _block_of(_shape(p)[-1], state[key + SCALE_SUFFIX].shape[-1], key)


def _blocks(x: Tensor, block: int) -> tuple[Tensor, int]:
    """``x`` (…, L) as (…, n_blocks, block), zero-padded; and L."""
    last = x.shape[-1]
    # whole blocks spelled as an exact division: in a compiled kernel, simpler index arithmetic
    n = last // block if last % block == 0 else _n_blocks(last, block)
    xb = F.pad(x, (0, n * block - last)) if n * block > last else x
    return xb.reshape(*x.shape[:-1], n, block), last  # sizes spelled out: a shard may hold no rows


def _unblock(xb: Tensor, last: int) -> Tensor:
    return xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])[..., :last]


def _pack4(codes: Tensor) -> Tensor:
    """int codes in [-7, 7] (…, L) → bytes (…, ceil(L/2)), low nibble first, offset 8."""
    u = (codes + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = F.pad(u, (0, 1), value=8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack4(packed: Tensor, last: int) -> Tensor:
    lo, hi = packed & 15, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :last].to(torch.int16) - 8


def _like(t: Tensor, p: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Local tensor ``t`` as a DTensor laid out as ``p`` (whole shape ``shape``), or ``t``."""
    from torch.distributed.tensor import DTensor

    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape), stride=stride)


def decode(state: Mapping[str, Any], key: str, kind: str, p: Tensor, fmt: str | None = None) -> Tensor:
    """The float working tensor (shape and device of ``p``) of stored state ``key``. For a
    sharded ``p`` each rank decodes its own rows (blocks never straddle ranks)."""
    fmt = format_of(state, key, kind, p) if fmt is None else fmt
    if is_dtensor(p):
        mine = {k: local(state[k]) for k in stored_keys(key, fmt)}
        return _like(decode(mine, key, kind, local(p), fmt), p, tuple(p.shape))
    dtype = working_dtype(p)
    if p.is_meta:
        return torch.empty(p.shape, dtype=dtype, device=p.device)
    if fmt in ("param", "bf16"):
        return state[key].to(dtype, copy=True).reshape(p.shape)
    scales = state[key + SCALE_SUFFIX]
    shape = _shape(p)
    block = _block_of(shape[-1], scales.shape[-1], key)
    if _fast(dtype, state[key], scales):
        out = torch.empty(p.shape, dtype=dtype)
        _native.codec(False, out, state[key], scales, block, kind == SECOND, fmt == "int4", _CODE_MAX[(fmt, kind)])
        return out
    dequantize = _DEQUANTIZE if p.device.type == "cuda" else _dequantize  # one fused pass on CUDA
    return dequantize(state[key], scales, fmt, kind, block, shape[-1], dtype).reshape(p.shape)


def _dequantize(codes: Tensor, scales: Tensor, fmt: str, kind: str, block: int, last: int, dtype: torch.dtype) -> Tensor:
    """Values (…, last) of int8/int4 ``codes`` and their block ``scales`` (torch operations:
    the eager codec)."""
    y = _unit(_unpack4(codes, last) if fmt == "int4" else codes, fmt, kind, dtype)
    yb, last = _blocks(y, block)
    x = _unblock(yb * scales.to(dtype).unsqueeze(-1), last)
    return x.square() if kind == SECOND else x.contiguous()  # (ragged blocks: a view; kernels take contiguous state)


def _unit(codes: Tensor, fmt: str, kind: str, dtype: torch.dtype) -> Tensor:
    """Codes as values in units of their block's scale: (|c|/top)², the sign kept for momenta."""
    y = codes.to(dtype).div_(_CODE_MAX[(fmt, kind)])
    return y.abs().square_().mul_(y.sign()) if kind == MOMENT else y.square_()


def _code(y: Tensor, fmt: str, kind: str) -> Tensor:
    """Values in units of their block's scale as the stored codes: uint8 for second moments
    (a positive v never becomes 0: its update would be divided by eps alone), int8 for int8
    momenta, int4 momenta packed two to a byte."""
    c = y.abs().sqrt_().mul_(_CODE_MAX[(fmt, kind)]).round_()
    if kind == SECOND:
        return torch.where(y > 0, c.clamp(min=1), c).to(torch.uint8)
    c = c.mul_(y.sign())
    return _pack4(c.to(torch.int16)) if fmt == "int4" else c.to(torch.int8)  # float -> int8 directly: it vectorizes


def encode(x: Tensor, fmt: str, kind: str, p: Tensor, block: int, key: int | None) -> dict[str, Tensor]:
    """The stored entries (by suffix, as :func:`zeros`) of working tensor ``x``; for a
    sharded ``p``, DTensors laid out as ``p`` (each rank encodes its own rows)."""
    if fmt == "param":
        return {"": x.to(p.dtype)}
    if is_dtensor(p):
        mine = encode(local(x), fmt, kind, local(p), block, key)
        shapes = {"": tuple(p.shape) if fmt == "bf16" else code_shape(p, fmt), SCALE_SUFFIX: scale_shape(p, block)}
        return {suffix: _like(t, p, shapes[suffix]) for suffix, t in mine.items()}
    if x.is_meta:  # shapes only (state sizes at scale, leanopt.bench.memory)
        return zeros(fmt, kind, p, block)
    if fmt == "bf16":
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
        stochastic_round_(out, x, key)
        return {"": out}
    x = x.reshape(_shape(p)).to(working_dtype(p))
    if _fast(x.dtype, x):
        out = zeros(fmt, kind, p, block)
        _native.codec(True, x.contiguous(), out[""], out[SCALE_SUFFIX], block, kind == SECOND, fmt == "int4",
                      _CODE_MAX[(fmt, kind)])
        return out
    codes, scales = (_QUANTIZE if x.device.type == "cuda" else _quantize)(x, fmt, kind, block)
    return {"": codes, SCALE_SUFFIX: scales}


def _quantize(x: Tensor, fmt: str, kind: str, block: int) -> tuple[Tensor, Tensor]:
    """The int8/int4 codes and float32 block scales of values ``x`` (…, last) (torch
    operations: the eager codec)."""
    if kind == SECOND:
        x = x.clamp(min=0).sqrt()
    xb, last = _blocks(x, block)
    scales = xb.abs().amax(dim=-1).to(torch.float32)
    safe = torch.where(scales > 0, scales, 1.0).to(xb.dtype).unsqueeze(-1)
    return _code(_unblock(xb / safe, last), fmt, kind), scales


_DEQUANTIZE, _QUANTIZE = Kernel(_dequantize), Kernel(_quantize)  # CUDA: one fused pass each


def _fast(dtype: torch.dtype, *tensors: Tensor) -> bool:
    """Whether the C codec (one pass, :func:`leanopt._native.codec`) takes these tensors:
    float32 working values on the CPU, contiguous. It decodes to the eager codec's bits and
    encodes to its codes except on exact rounding ties, where its correctly rounded square
    root may pick the neighbouring code (``docs/algorithms.md`` §8)."""
    return (dtype == torch.float32 and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and _native.library() is not None)


def bytes_per_element(fmt: str, block: int) -> float:
    """Bytes a format stores per element of a large tensor (codes plus block scales)."""
    return {"param": 4.0, "bf16": 2.0, "int8": 1 + 4 / block, "int4": 0.5 + 4 / block}[fmt]


# -- compact state inside a compiled kernel ----------------------------------------------


PACKED_FORMATS = ("int8", "int4", "bf16")  # the stored formats a compiled kernel takes as they are (Packed)


class Packed(NamedTuple):
    """A compact state entry as a compiled kernel takes it (:class:`CompactKernel`)."""

    codes: Tensor  # the int8/int4 codes or the bfloat16 tensor, as stored (or as rows: see ``rows``)
    scales: Tensor | None  # the block scales (None for bfloat16)
    key: Tensor | None  # bfloat16: this step's rounding key, as a tensor (an int would recompile every step)
    fmt: str  # "int8", "int4" or "bf16"
    block: int
    last: int  # the parameter's last dimension, along which the blocks run
    rows: bool = False  # viewed as rows of one block each (the blocks tile the parameter's rows)


def flat(x: Any, p: Tensor) -> Any:
    """One entry of a compiled kernel's column, for parameter ``p``: a tensor flattened, a
    :class:`leanopt._native.CompactState` as a :class:`Packed`, anything else as it is."""
    if isinstance(x, _native.CompactState):
        key = torch.tensor(x.key, dtype=torch.int64, device=x.codes.device) if x.fmt == "bf16" else None
        return Packed(x.codes, x.scales, key, x.fmt, x.block, _shape(p)[-1])
    return x.view(-1) if isinstance(x, Tensor) else x


def _kind(x: Packed) -> str:
    return SECOND if x.fmt == "int8" and x.codes.dtype == torch.uint8 else MOMENT


def _unpack(x: Packed) -> Tensor:
    """The float32 values of packed state ``x``: rows of one block (``x.rows``), or flat."""
    if x.fmt == "bf16":
        return x.codes.to(torch.float32).reshape(-1)
    if x.rows:
        return _dequantize(x.codes, x.scales, x.fmt, _kind(x), x.block, x.block, torch.float32)
    codes = x.codes.reshape(-1, x.codes.shape[-1])
    return _dequantize(codes, x.scales.reshape(codes.shape[0], -1), x.fmt, _kind(x), x.block, x.last,
                       torch.float32).reshape(-1)


def _repack_(x: Packed, values: Tensor) -> None:
    """Store float32 ``values`` (as :func:`_unpack` gave them) into packed state ``x``, in place."""
    if x.fmt == "bf16":
        x.codes.copy_(_rounded_to_bf16(values, x.key).view(x.codes.shape))
        return
    codes, scales = _quantize(values.view(-1, x.block if x.rows else x.last), x.fmt, _kind(x), x.block)
    x.codes.copy_(codes.view(x.codes.shape))
    x.scales.copy_(scales.view(x.scales.shape))


def _through_codes(kernel: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``kernel`` over the decoded values of the :class:`Packed` entries of its list columns;
    those encoded back after if the kernel wrote its tensors (returned None; a kernel that
    only reads them, as the mask's sums call, returns what it computed)."""
    work = [[_unpack(x) if isinstance(x, Packed) else x for x in a] if isinstance(a, list) else a for a in args]
    out = kernel(*work, **kwargs)
    if out is None:
        for column, values in zip(args, work):
            if isinstance(column, list):
                for x, v in zip(column, values):
                    if isinstance(x, Packed):
                        _repack_(x, v)
    return out


class CompactKernel:
    """A compiled kernel (:class:`leanopt._compile.Kernel`) of a function over lists of
    tensors, entry ``i`` of every list being tensor ``i``'s, that takes compact state too:
    :class:`Packed` entries (:func:`flat`) are decoded into float32 values inside the
    compiled graph and, if the kernel wrote its tensors, encoded back in it. Where a
    tensor's blocks tile its rows (int8/int4, ``last % block == 0``), every tensor of its
    entry is viewed as rows of one block, the block a static size: decoding is one scale a
    row, the absmax a reduction a row, and the step a loop over the blocks with static
    inner loops (without it, index arithmetic over symbolic sizes defeats vectorization).
    Bfloat16 state and ragged blocks are stepped flat. Calls without packed entries compile as
    ``Kernel(fn)`` does."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._plain = Kernel(fn)
        self._packed = Kernel(functools.update_wrapper(functools.partial(_through_codes, fn), fn))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lists = [j for j, a in enumerate(args) if isinstance(a, list)]
        entries: dict[int, list[Packed]] = {}
        for j in lists:
            for i, x in enumerate(args[j]):
                if isinstance(x, Packed):
                    entries.setdefault(i, []).append(x)
        if not entries:
            return self._plain(*args, **kwargs)
        args = [list(a) if isinstance(a, list) else a for a in args]
        for i, xs in entries.items():
            block = xs[0].block
            if any(x.fmt == "bf16" or x.block != block or x.last % block or (x.fmt == "int4" and block % 2) for x in xs):
                continue  # flat: bfloat16 state, ragged blocks, int4 rows of an odd length (one block a row)
            numel = xs[0].codes.numel() * (2 if xs[0].fmt == "int4" else 1)
            for j in lists:
                x = args[j][i]
                if isinstance(x, Packed):
                    codes = x.codes.view(-1, block // 2 if x.fmt == "int4" else block)
                    x = x._replace(codes=codes, scales=x.scales.view(-1, 1), rows=True)
                    torch._dynamo.mark_static(codes, 1)
                elif isinstance(x, Tensor) and x.numel() == numel:
                    x = x.view(-1, block)  # the entry's other tensors (p, g, float32 state) as block rows
                    torch._dynamo.mark_static(x, 1)
                args[j][i] = x
        return self._packed(*args, **kwargs)


# -- stochastic rounding -----------------------------------------------------------------

_M32 = 0xFFFFFFFF
INDEX_STRIDE = 0x9E3779B1  # the rounding hash's multiplier of an element's index (csrc/cpu_codec.h's too)


def rounding_key(seed: int, step: int, position: int) -> int:
    """The 32-bit key of tensor ``position``'s rounding bits at rounding step ``step``."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) >> 7 & _M32


def key_at(key: int, offset: int) -> int:
    """The key under which a part of a tensor starting at element ``offset`` draws the bits
    the whole tensor draws under ``key`` (:func:`rounding_bits` hashes index·stride + key)."""
    return (key + offset * INDEX_STRIDE) & _M32


def rounding_bits(key: int | Tensor, n: int, device: torch.device) -> Tensor:
    """16 random bits for each of ``n`` elements (int64): a counter-based hash of the
    element's index and ``key``, the same bits as the C kernel's (``csrc/cpu_codec.h``).
    Every product stays under 2**63."""
    x = (torch.arange(n, dtype=torch.int64, device=device) * INDEX_STRIDE + key) & _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x6C8E9CF5) & _M32
    x ^= x >> 16
    return x & 0xFFFF


def stochastic_round_(out: Tensor, x: Tensor, key: int | None) -> Tensor:
    """``out ← x`` rounded to bfloat16 stochastically: up with probability equal to the
    fraction of a bf16 step that ``x`` lies above the value below it (unbiased). Adds 16
    random bits (:func:`rounding_bits` of ``key``) below the bf16 mantissa of ``x``'s
    float32 bits and truncates; ±Inf and NaN stay what they are. ``out`` is bfloat16 (or a
    float tensor that receives the result); DTensors round their local shards. One C pass
    for contiguous CPU tensors."""
    key = 0 if key is None else key
    if is_dtensor(out):
        stochastic_round_(local(out), local(x), key)
        return out
    if out.is_meta:
        return out
    if out.dtype == torch.bfloat16 and out.numel() == x.numel() and _fast(x.dtype, x, out):
        _native.stochastic_round(out, x, key)
        return out
    out.copy_(_rounded_to_bf16(x.reshape(-1), key).reshape(out.shape))
    return out


def _rounded_to_bf16(x: Tensor, key: int | Tensor) -> Tensor:
    """Flat ``x`` rounded stochastically to bfloat16 values, held in float32 (torch
    operations; ``key`` may be a tensor, so that a compiled kernel takes every step's key)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    noise = rounding_bits(key, bits.numel(), bits.device).to(torch.int32)
    rounded = torch.where(torch.isfinite(x), (bits + noise) & -65536, bits & -65536).view(torch.float32)
    return torch.where(torch.isnan(x), x.to(torch.float32), rounded)


def uses_rounding(group: Mapping[str, Any]) -> bool:
    """Whether a group writes anything with stochastic rounding (bf16 state, bf16 updates)."""
    prec = group.get("state_precision", "param")
    values = prec.values() if isinstance(prec, Mapping) else (prec,)
    return bool(group.get("stochastic_rounding")) or "bf16" in values


def new_seed() -> int:
    """A rounding seed from torch's initial seed (set by ``torch.manual_seed``): reproducible
    under a seed, and drawn without touching torch's random stream."""
    return int(torch.initial_seed() % (2**31 - 1))
