"""int8 quantization with one absmax scale per token (scheme ``int8_absmax_per_token``).

Kept in numpy on purpose: the stored bytes must not depend on device or thread count, and
dequantization is needed by readers that do not import torch.
"""
import numpy as np


def quantize_int8(tokens: np.ndarray):
    """(B, m, h) float -> (int8 (B, m, h), float32 scales (B, m)). Raises on NaN/Inf."""
    x = np.asarray(tokens, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("non-finite values in tokens")
    absmax = np.abs(x).max(axis=-1)
    scales = (absmax / np.float32(127.0)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scales[..., None].astype(np.float32)


def decode_tokens(token_bytes: bytes, scale_bytes: bytes, num_tokens: int, token_dim: int) -> np.ndarray:
    """One stored row -> float32 (num_tokens, token_dim)."""
    q = np.frombuffer(token_bytes, dtype=np.int8).reshape(num_tokens, token_dim)
    return dequantize_int8(q, np.frombuffer(scale_bytes, dtype="<f4"))


def decode_embedding(emb_bytes: bytes) -> np.ndarray:
    return np.frombuffer(emb_bytes, dtype="<f2").astype(np.float32)
