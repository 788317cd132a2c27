"""The backbone's text tower as a query encoder: texts -> L2-normalised first-stage embeddings.

The embedding lives in the same space as the stored image ``embedding`` column (same open_clip
model, same checkpoint), so cosine similarity is a dot product.
"""
from typing import Optional, Sequence

import numpy as np
import torch

from models.checkpoint import load_vision_encoder, resolve_device


# Texts go through the tower in chunks of exactly this many rows (the last one padded): the GEMM
# kernels pick their blocking by row count (1-3 texts round differently from 4+ on AVX2), so a
# fixed count makes a text's embedding independent of its batch, and so of the runner's bundles.
CHUNK = 8


class TextEncoder:
    """The backbone (text tower used) and its open_clip tokenizer; what a worker holds."""

    def __init__(self, backbone, tokenizer, device: str):
        self.backbone, self.tokenizer, self.device = backbone, tokenizer, device

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (n, d) float32, L2-normalised, the same for a text whatever else is in the
        batch. Texts past the context length are truncated."""
        token_ids = self.tokenizer(list(texts))
        n = token_ids.shape[0]
        padded = torch.cat([token_ids, token_ids[-1:].expand(-n % CHUNK, -1)])
        with torch.inference_mode():
            out = [self.backbone.encode_text(chunk).float() for chunk in padded.to(self.device).split(CHUNK)]
        return torch.cat(out)[:n].cpu().numpy()


def load_text_encoder(checkpoint: Optional[str], device: str = "cpu"):
    """-> (TextEncoder, fingerprint). Loads the checkpoint's backbone (and adapter, unused here)."""
    encoder, _, fingerprint = load_vision_encoder(checkpoint, resolve_device(device))
    return TextEncoder(encoder.backbone, encoder.backbone.tokenizer(), device), fingerprint
