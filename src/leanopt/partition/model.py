"""The structure-aware partition: a walk over a model's modules (``nn.Linear``,
transformers' ``Conv1D``, embeddings, attention with its head geometry, fused QKV and
mixture-of-experts weights, norms, LoRA adapters, ...) that gives every parameter its
:class:`~leanopt.partition.rules.BlockRule`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

from .._optimizer import unwrap_model
from .layout import BlockLayout
from .rules import UNRECOGNIZED, BlockRule

__all__ = ["HeadGeometry", "ModelPartition", "partition_from_model"]



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
