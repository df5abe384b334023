"""Adam-mini's parameter partition: which elements share one second-moment scalar.

Adam-mini (Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More",
arXiv:2406.16793) keeps one second-moment value per *block* of a parameter, where a block
is one dense sub-block of the Hessian (the paper's Principle 1). For a transformer that
means (spec §1): one block per token row of an embedding or output head, one per
attention head of a query/key projection, one per output neuron of every other linear
layer, the Q/K/V parts of a fused projection treated separately, plain Adam for biases,
and one block per tensor for norms and everything else.

Every partition is expressed with one small data type, :class:`BlockLayout`: the tensor
is viewed as a 2-D matrix, one axis of which indexes *lanes* (output neurons, token rows,
chunks) and the other is averaged over; consecutive lanes are grouped into blocks by
``segments``. The optimizer step then needs no per-rule code: it reduces ``g²`` over the
averaged axis (one pass over the gradient), sums lanes into blocks, and broadcasts one
scale per lane back.

Three ways to obtain a partition:

* :func:`partition_from_model` reads module types (``nn.Linear``, transformers'
  ``Conv1D``, ``nn.Embedding``, ``nn.MultiheadAttention``, convolutions, norms, LoRA
  adapters, fused mixture-of-experts weights and their routers, ViT tokens and position
  tables, state-space layers) and the head geometry from the modules and the model's
  config; a parameter it has no rule for gets one block and is named in a warning;
* :func:`name_rule` reproduces the substring rules of the released ``adam-mini`` 1.1.1
  package exactly (``AdamMini(..., partition="names")``, or ``dim=``/``n_heads=`` without
  a model);
* :func:`partition_plain` is one block per tensor, when there is no model.

Any rule can be overridden per parameter name (``fnmatch`` patterns) with
``"element"``, ``"neuron"``, ``"whole"`` or ``"head:N"`` (blocks of N output neurons).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._optimizer import finite_terms, unwrap_model, user_stacklevel

__all__ = [
    "BlockLayout",
    "BlockRule",
    "PartitionRow",
    "PartitionWarning",
    "HeadGeometry",
    "ModelPartition",
    "UNRECOGNIZED",
    "partition_from_model",
    "name_rule",
    "partition_plain",
    "apply_overrides",
    "format_partition",
]


class PartitionWarning(UserWarning):
    """Adam-mini could not read a transformer structure and fell back to coarser blocks."""


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor's elements are grouped into blocks.

    The tensor (row-major) is viewed as ``view = (rows, cols)``. ``axis`` is the view
    dimension whose entries are *lanes*; the other dimension is averaged over. Lanes are
    grouped, in order, by ``segments``: each ``(length, lanes_per_block)`` run of
    ``length`` lanes forms ``length // lanes_per_block`` blocks.
    """

    view: tuple[int, int]
    axis: int
    segments: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValueError(f"axis must be 0 or 1, got {self.axis}")
        if sum(n for n, _ in self.segments) != self.view[self.axis]:
            raise ValueError(f"segments {self.segments} do not cover the {self.view[self.axis]} lanes of {self.view}")
        for n, k in self.segments:
            if k <= 0 or n % k:
                raise ValueError(f"segment of {n} lanes cannot be split into blocks of {k}")

    @property
    def lanes(self) -> int:
        return self.view[self.axis]

    @property
    def lane_size(self) -> int:
        """Elements averaged per lane."""
        return self.view[1 - self.axis]

    @property
    def numel(self) -> int:
        return self.view[0] * self.view[1]

    @property
    def n_blocks(self) -> int:
        return sum(n // k for n, k in self.segments)

    @property
    def uniform(self) -> int | None:
        """Lanes per block if every block has the same number of lanes, else None."""
        sizes = {k for _, k in self.segments}
        return sizes.pop() if len(sizes) == 1 else None

    # constructors ------------------------------------------------------------------
    @staticmethod
    def whole(numel: int) -> BlockLayout:
        return BlockLayout((1, numel), 0, ((1, 1),))

    @staticmethod
    def element(numel: int) -> BlockLayout:
        return BlockLayout((numel, 1), 0, ((numel, 1),))

    @staticmethod
    def per_lane(shape: torch.Size | tuple[int, ...], axis: int = 0) -> BlockLayout:
        """One block per output lane: a row (axis 0) or, of a 2-D weight, a column (axis 1)."""
        n = shape[axis] if len(shape) == 2 else shape[0]
        return BlockLayout.lanes_of(shape, axis, ((n, 1),))

    @staticmethod
    def lanes_of(shape: torch.Size | tuple[int, ...], axis: int, segments: tuple[tuple[int, int], ...]) -> BlockLayout:
        """Blocks along the output dimension of a 2-D weight (axis 0: rows, 1: columns)."""
        if len(shape) == 1:  # a vector's lanes are its elements
            return BlockLayout((shape[0], 1), 0, segments)
        rows = shape[0]
        cols = math.prod(shape[1:])
        return BlockLayout((rows, cols), axis, segments)


@functools.lru_cache(maxsize=4096)
def _lane_to_block(layout: BlockLayout) -> tuple[Tensor, Tensor]:
    """CPU tensors: block id of every lane, and element count of every block."""
    ids, counts, b = [], [], 0
    for n, k in layout.segments:
        nb = n // k
        ids.append(torch.arange(b, b + nb).repeat_interleave(k))
        counts.append(torch.full((nb,), float(k * layout.lane_size), dtype=torch.float64))
        b += nb
    return torch.cat(ids), torch.cat(counts)


@functools.lru_cache(maxsize=4096)
def lane_to_block(layout: BlockLayout, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_lane_to_block` on ``device`` (cached: no copy per step)."""
    ids, counts = _lane_to_block(layout)
    return ids.to(device), counts.to(device=device, dtype=dtype)


def block_mean_sq(g: Tensor, layout: BlockLayout, dtype: torch.dtype) -> Tensor:
    """``mean(g²)`` over every block, as a ``(n_blocks,)`` tensor of ``dtype``."""
    return block_sums(partial_lane_sq(g, layout, dtype), layout) / block_elements(layout, g.device, dtype)


def partial_lane_sq(g: Tensor, layout: BlockLayout, dtype: torch.dtype, flat_offset: int = 0) -> Tensor:
    """Sum of g² per lane of ``layout`` over the elements ``g`` holds: the whole tensor
    (``flat_offset=0``), or one rank's contiguous shard starting at ``flat_offset`` (whose
    lanes outside the shard get 0, so the ranks' results add up to the full sums)."""
    rows, cols = layout.view
    if flat_offset == 0 and g.numel() == layout.numel:
        return block_lane_sq(g.reshape(layout.view), layout.axis, dtype)
    out = torch.zeros(layout.lanes, dtype=dtype, device=g.device)
    if layout.axis == 0 and rows == 1:  # one lane, the whole tensor
        out[:] = block_lane_sq(g.reshape(1, -1), 0, dtype)
        return out
    if flat_offset % cols or g.numel() % cols:
        raise ValueError(f"a shard starting at element {flat_offset} with {g.numel()} elements does not hold whole rows "
                         f"of the {layout.view} block view; shard parameters along dim 0")
    part = block_lane_sq(g.reshape(-1, cols), layout.axis, dtype)
    if layout.axis == 1:  # every row holds a part of every lane (column)
        return part
    start = flat_offset // cols
    out[start:start + part.numel()] = part
    return out


def block_lane_sq(g2d: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    """Sum of squares per lane of a 2-D view (rows for axis 0, columns for axis 1), of the
    finite squares only (:func:`leanopt._optimizer.finite_terms`): a NaN gradient element
    must not reach the v of its whole block."""
    return finite_terms(g2d.to(dtype).square()).sum(dim=1 - axis)


def block_sums(lane_sq: Tensor, layout: BlockLayout) -> Tensor:
    """Per-lane sums → per-block sums."""
    k = layout.uniform
    if k is not None:  # contiguous equal blocks: a reshape, no index arithmetic
        return lane_sq.view(-1, k).sum(1) if k > 1 else lane_sq
    ids, _ = lane_to_block(layout, lane_sq.device, lane_sq.dtype)
    return torch.zeros(layout.n_blocks, device=lane_sq.device, dtype=lane_sq.dtype).index_add_(0, ids, lane_sq)


def block_elements(layout: BlockLayout, device: torch.device, dtype: torch.dtype) -> Tensor | float:
    """Elements per block (a number when all blocks are equal)."""
    k = layout.uniform
    if k is not None:
        return float(k * layout.lane_size)
    return lane_to_block(layout, device, dtype)[1]


def expand_blocks(block_values: Tensor, layout: BlockLayout) -> Tensor:
    """One value per block → a tensor broadcastable against ``view`` (one value per lane)."""
    k = layout.uniform
    if k is not None:
        lane = block_values if k == 1 else block_values.repeat_interleave(k)
    else:
        ids, _ = lane_to_block(layout, block_values.device, block_values.dtype)
        lane = block_values.index_select(0, ids)
    return lane.view(-1, 1) if layout.axis == 0 else lane.view(1, -1)


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockRule:
    """The partition of one parameter: a human-readable rule name, its layout, and
    whether the group's weight decay applies to it."""

    rule: str
    layout: BlockLayout
    decay: bool = True


@dataclass(frozen=True)
class PartitionRow:
    """One line of :meth:`AdamMini.describe_partition`."""

    name: str
    shape: tuple[int, ...]
    rule: str
    blocks: int
    state_elements: int  # m (one per element) + v (one per block)
    weight_decay: bool


@dataclass(frozen=True)
class HeadGeometry:
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None


_Q = {"q_proj", "query", "wq", "q", "to_q", "q_lin", "query_proj", "q_attn"}
_K = {"k_proj", "key", "wk", "k", "to_k", "k_lin", "key_proj"}
_V = {"v_proj", "value", "wv", "v", "to_v", "v_lin", "value_proj"}
_QKV_CONCAT = {"c_attn", "qkv_proj", "wqkv", "qkv", "in_proj", "qkv_linear"}
_QKV_INTERLEAVED = {"query_key_value"}
# module-path components that are wrappers around the real projection (peft, quantization)
_WRAPPERS = {"base_layer"}

_HEAD_DIM_KEYS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv", "kv_channels")
_N_HEADS_KEYS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
_N_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "num_query_groups")
_HIDDEN_KEYS = ("hidden_size", "embed_dim", "n_embd", "d_model", "dim")


def _first_int(obj: Any, keys: Iterable[str]) -> int | None:
    if obj is None:
        return None
    for k in keys:
        v = obj.get(k) if isinstance(obj, Mapping) else getattr(obj, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _model_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            cfg = cfg.get_text_config()
        except Exception:  # pragma: no cover - defensive against exotic configs
            pass
    return cfg


def _geometry(sources: Iterable[Any], user: HeadGeometry) -> HeadGeometry:
    """Head geometry: explicit arguments first, then each source (module, config) in turn."""
    n_heads, n_kv, head_dim = user.n_heads, user.n_kv_heads, user.head_dim
    hidden = None
    for src in sources:
        n_heads = n_heads or _first_int(src, _N_HEADS_KEYS)
        head_dim = head_dim or _first_int(src, _HEAD_DIM_KEYS)
        n_kv = n_kv or _first_int(src, _N_KV_KEYS)
        if n_kv is None and getattr(src, "multi_query", False) is True:
            n_kv = 1
        groups = _first_int(src, ("num_key_value_groups",))
        if n_kv is None and groups and n_heads:
            n_kv = n_heads // groups
        hidden = hidden or _first_int(src, _HIDDEN_KEYS)
    if head_dim is None and n_heads and hidden and hidden % n_heads == 0:
        head_dim = hidden // n_heads
    if n_kv is None:
        n_kv = n_heads
    return HeadGeometry(n_heads, n_kv, head_dim)


# parameters owned directly by a module that hold one learned token per row (ViT's class and
# register tokens, masked-modeling tokens)
_TOKEN_PARAMS = {"cls_token", "reg_token", "dist_token", "mask_token", "register_tokens"}

UNRECOGNIZED = "whole (no rule)"


def _rows_of_last(p: Tensor) -> BlockLayout:
    """One block per row of ``p`` viewed as ``(-1, last dim)``: a table of learned vectors."""
    rows = p.numel() // p.shape[-1]
    return BlockLayout((rows, p.shape[-1]), 0, ((rows, 1),))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D stores (in, out); matched by name so that
    # transformers stays an optional dependency
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2


def _role(path: list[str]) -> str | None:
    """Projection role from the module path, looking through wrapper components."""
    comps = [c.lower() for c in path]
    if any(c.startswith("lora_") for c in comps):
        return "lora"
    while comps and comps[-1] in _WRAPPERS:
        comps.pop()
    if not comps:
        return None
    last = comps[-1]
    for role, names in (("query", _Q), ("key", _K), ("value", _V), ("qkv", _QKV_CONCAT), ("qkv-interleaved", _QKV_INTERLEAVED)):
        if last in names:
            return role
    return None


def _attention_parent(model: nn.Module, path: list[str]) -> nn.Module | None:
    """The module that owns a projection (skipping wrappers), where head attributes live."""
    comps = list(path)
    while comps and comps[-1].lower() in _WRAPPERS:
        comps.pop()
    if not comps:
        return None
    try:
        return model.get_submodule(".".join(comps[:-1])) if len(comps) > 1 else model
    except AttributeError:  # pragma: no cover
        return None


class _Builder:
    """Walks a model's modules and assigns a rule to each parameter."""

    def __init__(self, model: nn.Module, user: HeadGeometry, value_blocks: str) -> None:
        self.model = model
        self.user = user
        self.value_blocks = value_blocks
        self.config = _model_config(model)
        self.rules: dict[Tensor, BlockRule] = {}
        self.names: dict[Tensor, str] = {}
        self.fallbacks: list[str] = []
        self.found_structure = False
        inp = out = None
        try:
            inp = model.get_input_embeddings()
            out = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            pass
        self.input_embedding = inp
        self.output_embedding = out

    def geometry(self, path: list[str]) -> HeadGeometry:
        parent = _attention_parent(self.model, path)
        return _geometry([parent, getattr(parent, "config", None), self.config], self.user)

    def set(self, p: Tensor | None, name: str, rule: BlockRule) -> None:
        if p is None or not isinstance(p, Tensor):
            return
        if p in self.rules:  # tied weight: the first (outermost, embedding) owner names it
            return
        self.rules[p] = rule
        self.names[p] = name

    # ----------------------------------------------------------------------------------
    def build(self) -> None:
        for mname, module in self.model.named_modules(remove_duplicate=False):
            path = mname.split(".") if mname else []
            prefix = f"{mname}." if mname else ""
            if isinstance(module, nn.Embedding):
                self._embedding(module, prefix)
            elif isinstance(module, nn.MultiheadAttention):
                self._mha(module, prefix)
            elif isinstance(module, nn.Linear) or _is_conv1d(module):
                self._linear(module, path, prefix)
            elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
                w = module.weight  # (out channels, in/groups, *kernel): one block per output channel
                self.set(w, prefix + "weight", BlockRule("channel", BlockLayout.per_lane(w.shape)))
            # every parameter not claimed above: biases, norms, parameters owned directly
            for pname, p in module.named_parameters(recurse=False):
                if p not in self.rules:
                    self.set(p, prefix + pname, self._direct(module, path, prefix + pname, p))

    def _direct(self, module: nn.Module, path: list[str], name: str, p: Tensor) -> BlockRule:
        """The rule of a parameter that a module owns directly (not through a layer type
        read above): recognized by the module's kind and the parameter's name and shape."""
        pname = name.rsplit(".", 1)[-1]
        low, kind = pname.lower(), type(module).__name__.lower()
        decay = p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)  # Mamba marks A_log and D so
        if low.endswith("bias"):
            return BlockRule("bias", BlockLayout.element(p.numel()), decay=False)
        if _is_norm(module):
            return BlockRule("norm", BlockLayout.whole(p.numel()), decay=False)
        if p.dim() == 3 and ("expert" in kind or hasattr(module, "num_experts")):
            return self._experts(module, name, pname, p)
        if p.dim() == 2 and low == "weight" and ("router" in kind or (path and path[-1].lower() in ("gate", "router"))):
            return BlockRule("router", BlockLayout.per_lane(p.shape), decay)
        if hasattr(module, "A_log") and pname in ("A_log", "D"):
            # a selective state-space layer: each channel has its own dynamics, so A_log's row
            # (its state decay rates) is one block, and D, a per-channel skip gain, is per element;
            # neither is decayed (as in the Mamba reference code, which marks both _no_weight_decay)
            if p.dim() == 2:
                return BlockRule("ssm-channel", BlockLayout.per_lane(p.shape), decay=False)
            return BlockRule("ssm-element", BlockLayout.element(p.numel()), decay=False)
        if p.dim() >= 2 and (low in _TOKEN_PARAMS or low.endswith(("_token", "_tokens"))):
            return BlockRule("learned-token", _rows_of_last(p), decay)
        if p.dim() >= 2 and ("pos" in low and "emb" in low):
            return BlockRule("position-embedding", _rows_of_last(p), decay)
        if p.dim() == 1 and low == "sinks":  # attention sinks (GPT-OSS): one logit per head, each its own block
            return BlockRule("attention-sink", BlockLayout.element(p.numel()), decay)
        if p.numel() == 1:
            return BlockRule("whole", BlockLayout.whole(1), decay)
        return BlockRule(UNRECOGNIZED, BlockLayout.whole(p.numel()), decay)

    def _experts(self, module: nn.Module, name: str, pname: str, p: Tensor) -> BlockRule:
        """Fused expert weights ``[n_experts, out, in]`` (the layout of ``F.linear``, current
        transformers): one block per output neuron of each expert. Stored transposed,
        ``[n_experts, in, out]`` (``module.is_transposed``, or the hidden size on the wrong
        axis), an output neuron is a strided column that a 2-D view cannot hold: one block
        per expert, with a warning."""
        n, a, b = p.shape
        transposed = getattr(module, "is_transposed", None)
        if not isinstance(transposed, bool):
            hidden = _first_int(module, ("hidden_dim", "hidden_size")) or _first_int(self.config, _HIDDEN_KEYS)
            transposed = False
            if hidden and a != b and hidden in (a, b):
                down = "down" in pname.lower() or pname.lower() == "w2"
                transposed = (b == hidden) if down else (a == hidden)  # down: out is hidden; else in is
        if not transposed:
            return BlockRule(f"expert-neuron ({n} experts)", BlockLayout((n * a, b), 0, ((n * a, 1),)))
        self.fallbacks.append(f"{name}: experts stored as [experts, in, out]; one block per expert")
        return BlockRule(f"expert ({n} experts, transposed)", BlockLayout((n, a * b), 0, ((n, 1),)))

    def _embedding(self, module: nn.Embedding, prefix: str) -> None:
        w = module.weight
        self.found_structure = True
        if module is self.input_embedding or module is self.output_embedding:
            label = "token-embedding"
        elif any(k in prefix.lower() for k in ("pos", "wpe")):
            label = "position-embedding"
        else:
            label = "embedding"
        self.set(w, prefix + "weight", BlockRule(label, BlockLayout.per_lane(w.shape)))

    def _mha(self, module: nn.MultiheadAttention, prefix: str) -> None:
        self.found_structure = True
        e, h = module.embed_dim, module.num_heads
        hd = self.user.head_dim or module.head_dim
        vseg = (e, e if self.value_blocks == "whole" else 1)
        if module.in_proj_weight is not None:
            w = module.in_proj_weight
            segs = ((e, hd), (e, hd), vseg)
            self.set(w, prefix + "in_proj_weight", BlockRule(f"qkv (q,k: {h} heads; v: {_vdesc(vseg)})", BlockLayout.lanes_of(w.shape, 0, segs)))
        else:
            for nm, seg, label in (("q_proj_weight", (e, hd), "query"), ("k_proj_weight", (e, hd), "key"), ("v_proj_weight", vseg, "value")):
                w = getattr(module, nm)
                self.set(w, prefix + nm, BlockRule(label, BlockLayout.lanes_of(w.shape, 0, (seg,))))

    def _linear(self, module: nn.Module, path: list[str], prefix: str) -> None:
        w = module.weight
        if w is None or w.dim() != 2:
            return
        axis = 1 if _is_conv1d(module) else 0
        n_out = w.shape[axis]
        name = prefix + "weight"
        role = _role(path)
        if role is not None and role != "lora" and hasattr(_attention_parent(self.model, path), "A_log"):
            role = None  # a state-space layer's in_proj is no attention projection: neurons
        if module is self.output_embedding:
            self.found_structure = True
            self.set(w, name, BlockRule("output", BlockLayout.per_lane(w.shape, axis)))
            return
        if role in (None, "lora"):
            self.set(w, name, BlockRule(role or "neuron", BlockLayout.per_lane(w.shape, axis)))
            return
        geo = self.geometry(path)
        segs = self._segments(role, n_out, geo)
        if segs is None:
            where = f"{name} ({role}, {n_out} outputs, heads={geo.n_heads}, kv_heads={geo.n_kv_heads}, head_dim={geo.head_dim})"
            if role == "qkv-interleaved" and self.value_blocks == "whole":
                reason = "value_blocks='whole' cannot gather values interleaved with the heads"
            elif self.user != HeadGeometry():
                raise ValueError(f"AdamMini: the head geometry given does not fit {where}; check n_heads=, n_kv_heads= "
                                 "and head_dim= (or leave them out to read them from the model)")
            else:
                reason = "head geometry unknown"
            self.fallbacks.append(f"{where}: {reason}; one block per output neuron")
            self.set(w, name, BlockRule("neuron", BlockLayout.per_lane(w.shape, axis)))
            return
        self.found_structure = True
        self.set(w, name, BlockRule(self._label(role, segs, geo), BlockLayout.lanes_of(w.shape, axis, segs)))

    def _segments(self, role: str, n_out: int, geo: HeadGeometry) -> tuple[tuple[int, int], ...] | None:
        hd = geo.head_dim
        vblock = n_out if self.value_blocks == "whole" else 1
        if role == "value":
            return ((n_out, vblock),)
        if hd is None:
            return None
        if role in ("query", "key"):
            return ((n_out, hd),) if n_out % hd == 0 else None
        nh, nkv = geo.n_heads, geo.n_kv_heads
        if nh is None or nkv is None or nkv == 0 or nh % nkv:
            return None
        if n_out != (nh + 2 * nkv) * hd:
            return None
        vlen = nkv * hd
        vseg = (vlen, vlen if self.value_blocks == "whole" else 1)
        if role == "qkv":  # [Q | K | V] concatenated
            return ((nh * hd, hd), (nkv * hd, hd), vseg)
        # query_key_value: per KV group [q × (nh/nkv), k, v], each head_dim outputs
        if self.value_blocks == "whole":
            return None  # V is scattered through the tensor: it cannot form a single block
        per = nh // nkv
        return ((per * hd, hd), (hd, hd), (hd, 1)) * nkv

    @staticmethod
    def _label(role: str, segs: tuple[tuple[int, int], ...], geo: HeadGeometry) -> str:
        if role in ("query", "key"):
            return f"{role} ({segs[0][0] // segs[0][1]} heads)"
        if role == "value":
            return "value" if segs[0][1] == 1 else "value (whole)"
        if role == "qkv":
            return f"qkv (q: {geo.n_heads}, k: {geo.n_kv_heads} heads; v: {_vdesc(segs[2])})"
        return f"qkv-interleaved (q: {geo.n_heads}, k: {geo.n_kv_heads} heads; v: neuron)"


def _vdesc(seg: tuple[int, int]) -> str:
    return "whole" if seg[1] == seg[0] and seg[0] > 1 else "neuron"


class ModelPartition(NamedTuple):
    """What :func:`partition_from_model` found."""

    rules: dict[Tensor, BlockRule]  # every parameter's rule
    names: dict[Tensor, str]  # and its name
    fallbacks: list[str]  # parameters given coarser blocks than their rule, and why
    found_structure: bool  # whether any embedding, output head or attention projection was found


def partition_from_model(
    model: nn.Module,
    *,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    value_blocks: str = "neuron",
) -> ModelPartition:
    """Structure-aware partition of every parameter of ``model``. Parameters with no rule
    get :data:`UNRECOGNIZED` (one block per tensor)."""
    b = _Builder(unwrap_model(model), HeadGeometry(n_heads, n_kv_heads, head_dim), value_blocks)
    b.build()
    return ModelPartition(b.rules, b.names, b.fallbacks, b.found_structure)


# -- adam-mini 1.1.1 name rules -----------------------------------------------------------

# The substring sets of the released adam-mini 1.1.1, kept verbatim for drop-in parity.
EMBD_NAMES = ("embed", "embd", "wte")
OUTPUT_NAMES = ("lm_head", "output", "final_layer")
WQK_NAMES = ("k_proj", "q_proj", "wq", "wk", "query", "key")
WV_NAMES = ("v_proj", "wv", "value")
ATTN_PROJ_NAMES = ("o_proj", "wo", "attn.proj")
MLP_NAMES = ("feed_forward", "linear", "mlp")


def name_rule(name: str, shape: torch.Size | tuple[int, ...], dim: int | None, n_heads: int | None) -> BlockRule:
    """The block rule adam-mini 1.1.1 applies to the parameter called ``name``."""
    low = name.lower()
    numel = math.prod(shape)
    decay = not ("norm" in low or "ln" in low or "bias" in low)
    if "bias" in low:
        return BlockRule("bias", BlockLayout.element(numel), decay)
    if any(k in low for k in WQK_NAMES):
        if dim is None or n_heads is None:
            raise ValueError(
                f"AdamMini: parameter {name!r} is a query/key projection by name, so the name-based "
                "partition needs dim= and n_heads= (or pass model= for the structure-aware partition)"
            )
        if (dim * dim) % n_heads:
            raise ValueError(f"AdamMini: dim*dim={dim * dim} is not divisible by n_heads={n_heads}")
        head_numel = dim * dim // n_heads
        if numel % head_numel:
            raise ValueError(
                f"AdamMini: {name!r} has {numel} elements, not a multiple of dim*dim/n_heads={head_numel}; "
                "check dim= and n_heads="
            )
        chunks = numel // head_numel
        label = "query" if any(k in low for k in ("q_proj", "wq", "query")) else "key"
        return BlockRule(f"{label} ({chunks} heads)", BlockLayout((chunks, head_numel), 0, ((chunks, 1),)), decay)
    for label, keys in (("embedding", EMBD_NAMES), ("output", OUTPUT_NAMES), ("value", WV_NAMES), ("attn-proj", ATTN_PROJ_NAMES), ("mlp", MLP_NAMES)):
        if any(k in low for k in keys):
            return BlockRule(label, BlockLayout.per_lane(tuple(shape)) if len(shape) else BlockLayout.whole(1), decay)
    return BlockRule("whole", BlockLayout.whole(numel), decay)


def partition_plain(params: Iterable[Tensor]) -> dict[Tensor, BlockRule]:
    """One block per tensor; vectors and scalars are excluded from weight decay."""
    return {p: BlockRule("whole", BlockLayout.whole(p.numel()), decay=p.dim() >= 2) for p in params}


# -- overrides --------------------------------------------------------------------------


def override_rule(spec: str, p: Tensor, current: BlockRule) -> BlockRule:
    """Rule for ``spec`` ("element", "neuron", "whole", "head:N") on ``p``, keeping the
    output axis the structure-aware partition found (columns for ``Conv1D``)."""
    numel = p.numel()
    axis = current.layout.axis if p.dim() == 2 else 0
    if spec == "element":
        return BlockRule("element (override)", BlockLayout.element(numel), current.decay)
    if spec == "whole":
        return BlockRule("whole (override)", BlockLayout.whole(numel), current.decay)
    if p.dim() == 0:
        raise ValueError(f"override {spec!r} needs a parameter with an output dimension")
    n_out = p.shape[axis] if p.dim() == 2 else p.shape[0]
    if spec == "neuron":
        return BlockRule("neuron (override)", BlockLayout.per_lane(p.shape, axis), current.decay)
    if spec.startswith("head:"):
        try:
            k = int(spec[5:])
        except ValueError:
            raise ValueError(f"override {spec!r}: expected head:<outputs per head>") from None
        if k <= 0 or n_out % k:
            raise ValueError(f"override {spec!r}: {n_out} outputs are not a multiple of {k}")
        return BlockRule(f"head (override, {n_out // k} heads)", BlockLayout.lanes_of(p.shape, axis, ((n_out, k),)), current.decay)
    raise ValueError(f"unknown partition override {spec!r}; use 'element', 'neuron', 'whole' or 'head:N'")


def apply_overrides(rules: dict[Tensor, BlockRule], names: Mapping[Tensor, str], overrides: Mapping[str, str]) -> None:
    """Replace the rule of every parameter whose name matches an ``overrides`` pattern."""
    used = set()
    for p, rule in list(rules.items()):
        name = names.get(p)
        if name is None:
            continue
        for pattern, spec in overrides.items():
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                rules[p] = override_rule(spec, p, rule)
                used.add(pattern)
                break
    unused = [k for k in overrides if k not in used]
    if unused:
        raise ValueError(f"AdamMini: partition overrides matched no parameter: {unused}")


# -- reporting --------------------------------------------------------------------------


def format_partition(rows: list[PartitionRow], *, bytes_per_element: int = 4, detail: bool = True) -> str:
    """A text table of a partition and the state memory of Adam-mini against AdamW."""
    lines = []
    if detail:
        w = max([len(r.name) for r in rows] + [9])
        rw = max([len(r.rule) for r in rows] + [4])
        lines.append(f"{'parameter':<{w}}  {'shape':<14} {'rule':<{rw}}  {'blocks':>8}  {'state elems':>12}  wd")
        for r in rows:
            shape = "x".join(map(str, r.shape)) or "scalar"
            lines.append(f"{r.name:<{w}}  {shape:<14} {r.rule:<{rw}}  {r.blocks:>8}  {r.state_elements:>12}  {'yes' if r.weight_decay else 'no'}")
        lines.append("")
    by_rule: dict[str, list[int]] = {}
    for r in rows:
        key = r.rule.split(" (")[0]
        agg = by_rule.setdefault(key, [0, 0, 0])
        agg[0] += 1
        agg[1] += math.prod(r.shape)
        agg[2] += r.blocks
    lines.append(f"{'rule':<20} {'tensors':>8} {'elements':>14} {'blocks':>12}")
    for k, (n, el, bl) in sorted(by_rule.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{k:<20} {n:>8} {el:>14,} {bl:>12,}")
    n_params = sum(math.prod(r.shape) for r in rows)
    mini = sum(r.state_elements for r in rows)
    adamw = 2 * n_params
    mb = 1024 * 1024
    lines.append("")
    lines.append(f"parameters:                {n_params:>14,} elements")
    lines.append(
        f"Adam-mini state (m + v):   {mini:>14,} elements = {mini / n_params:.4f} x params"
        f"  ({mini * bytes_per_element / mb:,.2f} MiB at {bytes_per_element} B/element)"
    )
    lines.append(
        f"AdamW state (m + v):       {adamw:>14,} elements = 2.0000 x params"
        f"  ({adamw * bytes_per_element / mb:,.2f} MiB at {bytes_per_element} B/element)"
    )
    lines.append(f"saving against AdamW:      {1 - mini / adamw:.1%} of optimizer-state memory")
    return "\n".join(lines)


def warn_fallbacks(fallbacks: list[str]) -> None:
    if fallbacks:
        warnings.warn(
            f"AdamMini used coarser blocks than its rule for {len(fallbacks)} parameter(s): "
            + "; ".join(fallbacks[:3])
            + ("; ..." if len(fallbacks) > 3 else "")
            + ". Pass n_heads=, n_kv_heads= and/or head_dim= for attention projections, overrides= for the rest.",
            PartitionWarning,
            stacklevel=user_stacklevel(),
        )


def warn_unrecognized(names: list[str]) -> None:
    if names:
        warnings.warn(
            f"AdamMini has no partition rule for {len(names)} parameter(s) and gives each one block: "
            + ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            + " (set a rule with overrides= to silence this)",
            PartitionWarning,
            stacklevel=user_stacklevel(),
        )
