"""Token-compression adapter (EDJE, arXiv 2510.06820, Sec. 3).

``num_tokens`` learnable queries cross-attend over the backbone's n patch tokens (keys and values
get their own linear projections first), a pre-LayerNorm residual MLP refines them, and a linear
layer maps them to the joint encoder's hidden width: (B, n, d_vision) -> (B, m, h).

Cross-attention over the patch tokens is blind to their order. ``grid`` > 0 (the backbone's patch
grid side) adds fixed 2-D sine-cosine position codes to the keys and values (not in the paper:
an option for tasks where *where* matters, such as the scenes benchmark's relations).
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from models.config import JsonConfig


@dataclass(frozen=True)
class AdapterConfig(JsonConfig):
    num_tokens: int = 64
    input_dim: int = 768
    output_dim: int = 384
    num_heads: int = 8
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-6
    grid: int = 0  # > 0: add 2-D position codes for a grid x grid patch layout


class TokenCompressionAdapter(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        if cfg.input_dim % cfg.num_heads:
            raise ValueError(f"input_dim {cfg.input_dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        d = cfg.input_dim
        # Small init: at start the queries attend almost uniformly, i.e. begin as mean pooling.
        self.queries = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * 0.02)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attention = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, d))
        self.projection = nn.Linear(d, cfg.output_dim)
        if cfg.grid:
            self.register_buffer("positions", sincos_2d(cfg.grid, d), persistent=False)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.grid:
            if patch_tokens.shape[1] != self.positions.shape[1]:
                raise ValueError(f"adapter expects {self.positions.shape[1]} patch tokens, got {patch_tokens.shape[1]}")
            patch_tokens = patch_tokens + self.positions.to(patch_tokens.dtype)
        queries = self.queries.expand(patch_tokens.shape[0], -1, -1)
        x, _ = self.attention(queries, self.key(patch_tokens), self.value(patch_tokens), need_weights=False)
        x = x + self.mlp(self.norm(x))
        return self.projection(x)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(1, grid*grid, dim) fixed 2-D sine-cosine codes, row-major like ViT patch order."""
    if dim % 4:
        raise ValueError("position codes need input_dim divisible by 4")
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * freq[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float().unsqueeze(0)
