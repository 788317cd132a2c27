"""Token quantization schemes of the store, in numpy.

Kept in numpy on purpose: the stored bytes must not depend on device or thread count, and
dequantization is needed by readers that do not import torch.

Two schemes; a store declares its scheme in ``manifest.json`` (``quantization.scheme``) and in
each shard's Parquet metadata (``edje.quantization``), and readers decode by that name:

* ``int8_absmax_per_token`` (default): ``tokens`` is int8 row-major (m, h); ``token_scales`` one
  little-endian float32 per token, ``scale = max|x| / 127``. 24,576 + 256 bytes at 64 x 384.
* ``int4_absmax_channel_token``: a rank-1 scale per image, ``step[t, c] = token_scale[t] *
  channel_scale[c]``, with ``channel_scale[c] = max over tokens |x[:, c]|`` and ``token_scale[t]
  = max over channels |x[t, :] / channel_scale| / 7``, both float16 rounded up (so no value needs
  clipping); ``q = round(x / step)`` in [-7, 7]. ``tokens`` holds ``q + 8`` as nibbles, two per
  byte, low nibble first, row-major over the flattened (m, h) (an odd count is padded with 8);
  ``token_scales`` holds h float16 channel scales, then m float16 token scales. 12,288 + 896 bytes
  at 64 x 384. Per-channel scales because adapter tokens have outlier channels: on the trained
  scenes checkpoint it halves the error of int4 with fp16 absmax groups of 64 channels at about
  the same size (BENCHMARKS.md, "A 4-bit token store").
"""
from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np

INT8 = "int8_absmax_per_token"
INT4 = "int4_absmax_channel_token"
DEFAULT_SCHEME = INT8
# --quantization values of pipeline.precompute -> scheme names
CLI_NAMES = {"int8": INT8, "int4": INT4}
_FP16_MAX = float(np.finfo(np.float16).max)


class UnknownSchemeError(ValueError):
    pass


def _finite(tokens) -> np.ndarray:
    x = np.asarray(tokens, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("non-finite values in tokens")
    return x


# ---------------------------------------------------------------- int8, one absmax scale per token
def quantize_int8(tokens: np.ndarray):
    """(B, m, h) float -> (int8 (B, m, h), float32 scales (B, m)). Raises on NaN/Inf."""
    x = _finite(tokens)
    absmax = np.abs(x).max(axis=-1)
    scales = (absmax / np.float32(127.0)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scales[..., None].astype(np.float32)


# ---------------------------------------------------------------- int4, token x channel absmax scales
def _fp16_ceil(v: np.ndarray) -> np.ndarray:
    """float32 -> the smallest float16 >= v (v >= 0), so that a rounded scale never clips."""
    with np.errstate(over="ignore"):  # overflow is reported below, as a rejected output
        h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    if low.any():
        h[low] = np.nextafter(h[low], np.float16(np.inf))
    if np.isinf(h).any():
        raise ValueError(f"token values beyond float16 range ({_FP16_MAX}) cannot take int4 scales")
    return h


def quantize_int4(tokens: np.ndarray):
    """(B, m, h) float -> (int8 q in [-7, 7] (B, m, h), float16 channel scales (B, h),
    float16 token scales (B, m)). Raises on NaN/Inf and on values beyond float16 range."""
    x = _finite(tokens)
    channel = _fp16_ceil(np.abs(x).max(axis=1))  # (B, h)
    c = channel.astype(np.float32)
    y = x / np.where(c > 0, c, np.float32(1.0))[:, None, :]  # |y| <= 1
    token = _fp16_ceil(np.abs(y).max(axis=-1) / np.float32(7.0))  # (B, m)
    step = _int4_step(token, channel)
    q = np.clip(np.rint(x / np.where(step > 0, step, np.float32(1.0))), -7, 7).astype(np.int8)
    return q, channel, token


def _int4_step(token: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """float16 (B, m), (B, h) -> float32 (B, m, h): the one product every reader computes."""
    return token.astype(np.float32)[:, :, None] * channel.astype(np.float32)[:, None, :]


def dequantize_int4(q: np.ndarray, channel: np.ndarray, token: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * _int4_step(token, channel)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 (B, ...) in [-7, 7] -> uint8 (B, ceil(n / 2)): q + 8 as nibbles, low nibble first."""
    u = (q.reshape(len(q), -1).astype(np.int16) + 8).astype(np.uint8)
    if u.shape[1] % 2:
        u = np.concatenate([u, np.full((len(u), 1), 8, np.uint8)], axis=1)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 (B, ceil(count / 2)) -> int8 (B, count) in [-8, 7]."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty((len(packed), packed.shape[1] * 2), np.int8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out[:, :count] - np.int8(8)


# ---------------------------------------------------------------- the schemes, as the store sees them
@dataclass(frozen=True)
class Scheme:
    """How one scheme lays out the ``tokens`` and ``token_scales`` bytes of a row."""
    name: str
    dtype: str
    granularity: str
    scale_dtype: str
    token_bytes: Callable[[int, int], int]  # (num_tokens, token_dim) -> bytes per row
    scale_bytes: Callable[[int, int], int]
    encode: Callable  # float (B, m, h) -> (uint8 (B, token_bytes), uint8 (B, scale_bytes))
    decode: Callable  # (uint8 (B, token_bytes), uint8 (B, scale_bytes), m, h) -> float32 (B, m, h)

    def manifest_entry(self) -> dict:
        return {"scheme": self.name, "dtype": self.dtype, "granularity": self.granularity,
                "scale_dtype": self.scale_dtype, "embedding_dtype": "float16"}

    def row_bytes(self, num_tokens: int, token_dim: int) -> int:
        return self.token_bytes(num_tokens, token_dim) + self.scale_bytes(num_tokens, token_dim)


def _rows(a) -> np.ndarray:
    """Byte rows as uint8 (B, width); a 1-D input is one row."""
    a = np.asarray(a)
    return a.view(np.uint8).reshape(len(a), -1) if a.ndim > 1 else a.view(np.uint8).reshape(1, -1)


def _encode_int8(tokens):
    q, s = quantize_int8(tokens)
    return _rows(q.reshape(len(q), -1)), _rows(s.astype("<f4"))


def _decode_int8(tok, sc, m, h):
    q = np.ascontiguousarray(tok).view(np.int8).reshape(-1, m, h)
    s = np.ascontiguousarray(sc).view("<f4").reshape(-1, m)
    return q.astype(np.float32) * s[..., None]  # == dequantize_int8, bit for bit


def _encode_int4(tokens):
    q, channel, token = quantize_int4(tokens)
    scales = np.concatenate([channel.astype("<f2"), token.astype("<f2")], axis=1)
    return pack_int4(q), _rows(scales)


def _decode_int4(tok, sc, m, h):
    q = unpack_int4(np.ascontiguousarray(tok), m * h).reshape(-1, m, h)
    s = np.ascontiguousarray(sc).view("<f2").reshape(-1, h + m)
    return dequantize_int4(q, s[:, :h], s[:, h:])


SCHEMES: Dict[str, Scheme] = {s.name: s for s in (
    Scheme(INT8, "int8", "token", "float32",
           token_bytes=lambda m, h: m * h, scale_bytes=lambda m, h: m * 4,
           encode=_encode_int8, decode=_decode_int8),
    Scheme(INT4, "int4", "token x channel", "float16",
           token_bytes=lambda m, h: (m * h + 1) // 2, scale_bytes=lambda m, h: (h + m) * 2,
           encode=_encode_int4, decode=_decode_int4),
)}


def get_scheme(name: str) -> Scheme:
    """The scheme a store declares; a clear error for one this code does not know."""
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise UnknownSchemeError(f"unknown quantization scheme {name!r}: this code reads "
                                 f"{', '.join(sorted(SCHEMES))}") from None


def scheme_for_cli(value: str) -> str:
    """--quantization value (int8, int4, or a full scheme name) -> scheme name."""
    return CLI_NAMES.get(value) or get_scheme(value).name


def decode_tokens(token_bytes: bytes, scale_bytes: bytes, num_tokens: int, token_dim: int,
                  scheme: str = DEFAULT_SCHEME) -> np.ndarray:
    """One stored row -> float32 (num_tokens, token_dim), by the store's scheme."""
    s = get_scheme(scheme)
    tok = np.frombuffer(token_bytes, np.uint8)
    sc = np.frombuffer(scale_bytes, np.uint8)
    if len(tok) != s.token_bytes(num_tokens, token_dim) or len(sc) != s.scale_bytes(num_tokens, token_dim):
        raise ValueError(f"{len(tok)} token / {len(sc)} scale bytes do not fit {scheme} at "
                         f"{num_tokens} x {token_dim}")
    return s.decode(tok[None], sc[None], num_tokens, token_dim)[0]


def decode_embedding(emb_bytes: bytes) -> np.ndarray:
    return np.frombuffer(emb_bytes, dtype="<f2").astype(np.float32)
