"""A small decoder-only GPT with Llama-style module names.

``embed_tokens`` → N × (``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` with RoPE and
optional grouped-query attention, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj`` SwiGLU) → ``norm`` → ``lm_head``. The names and the head
attributes (``n_heads``, ``n_kv_heads``, ``head_dim``) are those Adam-mini's
structure-aware partition reads, and the sizes are dataclass presets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPTConfig", "GPT", "PRESETS", "build_model"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head attention)
    head_dim: int | None = None  # None: dim // n_heads
    mlp_hidden: int | None = None  # None: 4 * dim * 2/3 rounded up to a multiple of 32 (SwiGLU)
    max_seq_len: int = 256
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # biases on the attention's four projections and the MLP's three linears (as GPT-2; not
    # on the output head). With RoPE a key bias is not a constant shift of the scores (it is
    # rotated with its key's position), so its gradient is a real one.
    bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"GPTConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"GPTConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.resolved_head_dim % 2:
            raise ValueError(f"GPTConfig head_dim={self.resolved_head_dim} must be even for RoPE")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        return self.mlp_hidden or 32 * math.ceil(self.dim * 8 / 3 / 32)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    # for tests: a few thousand parameters
    "tiny": GPTConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
    # the built-in demo model: ~1.3M parameters, fits a 2-core CPU
    "demo": GPTConfig(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "small": GPTConfig(vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=256),
    # GPT-2-small-sized, for a GPU
    "gpt2-small": GPTConfig(vocab_size=50304, dim=768, n_layers=12, n_heads=12, max_seq_len=1024, mlp_hidden=2048),
}


def build_model(preset: str | GPTConfig = "demo", **overrides) -> "GPT":
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    return GPT(replace(preset, **overrides) if overrides else preset)


def _rope(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return freqs.cos(), freqs.sin()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, D); rotate the two halves of the head dimension (Llama/NeoX convention)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.resolved_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        h = cfg.resolved_mlp_hidden
        self.gate_proj = nn.Linear(cfg.dim, h, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.dim, h, bias=cfg.bias)
        self.down_proj = nn.Linear(h, cfg.dim, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx, targets=None)`` returns ``(logits, loss)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = _rope(config.max_seq_len, config.resolved_head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.embed_tokens.weight.is_meta:
            return
        std = 0.02
        # residual projections scaled down with depth (GPT-2)
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() < 2:  # norms
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        t = idx.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            # 16-bit logits are upcast for the softmax; float64 ones stay float64 (.float() would
            # round a float64 model's loss, and its gradient, to float32)
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(wide.view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss
