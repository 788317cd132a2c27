"""Token-compression adapter (EDJE, arXiv 2510.06820, Sec. 3).

``num_tokens`` learnable queries cross-attend over the backbone's n patch tokens (keys and values
get their own linear projections first), a pre-LayerNorm residual MLP refines them, and a linear
layer maps them to the joint encoder's hidden width: (B, n, d_vision) -> (B, m, h).

Cross-attention over the patch tokens is blind to their order. ``grid`` > 0 (the backbone's patch
grid side) adds fixed 2-D sine-cosine position codes to the keys and values (not in the paper:
an option for tasks where *where* matters, such as the scenes benchmark's relations).
``locality`` > 0 (with ``grid`` and a square ``num_tokens``) lays the queries out on a coarser
grid and adds a learnable bias to their attention logits, initialised to a Gaussian prior
exp(-d^2 / (2 (locality * cell)^2)) in log space: query k starts out reading its own cell of the
image, so output token k keeps a place the joint encoder can see from the token's index; the
bias is trained with everything else and can give the prior up. ``cells`` makes that hard: query k
reads only the patches inside its own cell, so token k always describes one fixed part of the
image. ``output_positions`` adds learned row and column embeddings (one per row, one per column of
the token grid) to the output tokens: "left" is then one direction shared by a whole column,
which a joint encoder can compare between the tokens that hold two named objects.
``output_norm`` > 0 ends the adapter with a LayerNorm whose gain starts at that value. Without it
the tokens start ~10x the norm of MiniLM's word embeddings, and the joint encoder's own
LayerNorm then drowns its position embeddings (~0.45) in the token's content: the image tokens'
places are all but invisible to it.
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
    locality: float = 0.0  # > 0: learnable locality bias on the queries' attention (needs grid)
    cells: bool = False  # each query attends only inside its own cell of the token grid (needs grid)
    output_positions: bool = False  # learned row + column embeddings added to the output tokens
    output_norm: float = 0.0  # > 0: a final LayerNorm, gain initialised to this (MiniLM's words: ~0.055)

    def __post_init__(self):
        square = math.isqrt(self.num_tokens) ** 2 == self.num_tokens
        if (self.locality or self.cells) and (not self.grid or not square):
            raise ValueError("adapter locality and cells need grid > 0 and a square num_tokens")
        if self.cells and self.grid % math.isqrt(self.num_tokens):
            raise ValueError(f"adapter cells: the {self.grid}x{self.grid} patch grid does not split into "
                             f"{math.isqrt(self.num_tokens)}x{math.isqrt(self.num_tokens)} cells")
        if self.output_positions and not square:
            raise ValueError("adapter output_positions needs a square num_tokens")

    def to_dict(self):
        d = super().to_dict()
        for name in ("locality", "cells", "output_positions", "output_norm"):
            if not d[name]:
                del d[name]  # checkpoints from before the option keep their fingerprint
        return d


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
        side = math.isqrt(cfg.num_tokens)
        if cfg.locality:
            self.attention_bias = nn.Parameter(locality_prior(side, cfg.grid, cfg.locality))
        if cfg.cells:
            self.register_buffer("outside_cell", ~same_cell(side, cfg.grid), persistent=False)
        if cfg.output_norm:
            self.output_norm = nn.LayerNorm(cfg.output_dim, eps=cfg.layer_norm_eps)
            nn.init.constant_(self.output_norm.weight, cfg.output_norm)
        if cfg.output_positions:
            # at the scale of BERT's own position embeddings (init std 0.02 there, ~0.03 trained)
            # next to its word embeddings (~0.055 a dimension); larger tokens (a gain above that,
            # for a joint encoder's middle layers) get proportionally larger positions
            std = 0.03 * max(1.0, cfg.output_norm / 0.055)
            self.rows = nn.Parameter(torch.randn(side, cfg.output_dim) * std)
            self.columns = nn.Parameter(torch.randn(side, cfg.output_dim) * std)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.grid:
            if patch_tokens.shape[1] != self.positions.shape[1]:
                raise ValueError(f"adapter expects {self.positions.shape[1]} patch tokens, got {patch_tokens.shape[1]}")
            patch_tokens = patch_tokens + self.positions.to(patch_tokens.dtype)
        queries = self.queries.expand(patch_tokens.shape[0], -1, -1)
        bias = self.attention_bias.to(patch_tokens.dtype) if self.cfg.locality else None
        if self.cfg.cells:
            blocked = torch.zeros(self.outside_cell.shape, dtype=patch_tokens.dtype, device=patch_tokens.device)
            blocked = blocked.masked_fill(self.outside_cell, float("-inf"))
            bias = blocked if bias is None else bias + blocked
        x, _ = self.attention(queries, self.key(patch_tokens), self.value(patch_tokens), attn_mask=bias,
                              need_weights=False)
        x = x + self.mlp(self.norm(x))
        x = self.projection(x)
        if self.cfg.output_norm:
            x = self.output_norm(x)
        if self.cfg.output_positions:
            side = self.rows.shape[0]
            x = x + (self.rows[:, None, :] + self.columns[None, :, :]).reshape(side * side, -1).to(x.dtype)
        return x


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


def locality_prior(query_grid: int, patch_grid: int, width: float) -> torch.Tensor:
    """(query_grid^2, patch_grid^2) log-Gaussian of the distance between each query's cell centre
    and each patch centre, in units of one query cell (both grids row-major over the image)."""
    q = (torch.arange(query_grid, dtype=torch.float64) + 0.5) / query_grid
    p = (torch.arange(patch_grid, dtype=torch.float64) + 0.5) / patch_grid
    qy, qx = torch.meshgrid(q, q, indexing="ij")
    py, px = torch.meshgrid(p, p, indexing="ij")
    d2 = ((qy.reshape(-1, 1) - py.reshape(1, -1)) ** 2 + (qx.reshape(-1, 1) - px.reshape(1, -1)) ** 2) * query_grid ** 2
    return (-d2 / (2 * width ** 2)).float()


def same_cell(query_grid: int, patch_grid: int) -> torch.Tensor:
    """(query_grid^2, patch_grid^2) bool: True where a patch lies inside the query's cell (row-major)."""
    per = patch_grid // query_grid
    cell = torch.arange(patch_grid) // per
    patch_cell = (cell[:, None] * query_grid + cell[None, :]).reshape(-1)
    return torch.arange(query_grid * query_grid)[:, None] == patch_cell[None, :]
