import numpy as np
import pytest

from models.quantization import decode_tokens, dequantize_int8, quantize_int8


def test_int8_per_token_error_is_within_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16, 384)).astype(np.float32) * rng.uniform(0.01, 10, (5, 16, 1)).astype(np.float32)
    q, s = quantize_int8(x)
    assert q.dtype == np.int8 and s.shape == (5, 16) and s.dtype == np.float32
    err = np.abs(dequantize_int8(q, s) - x)
    assert (err <= s[..., None] * 0.5 + 1e-6).all()
    cos = (dequantize_int8(q, s) * x).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(dequantize_int8(q, s), axis=-1)
    assert cos.min() > 0.999
    assert np.abs(q).max() == 127  # absmax maps to the full range


def test_zero_tokens_and_non_finite_values():
    q, s = quantize_int8(np.zeros((1, 2, 8), np.float32))
    assert (q == 0).all() and (s == 0).all()
    bad = np.ones((1, 2, 8), np.float32)
    bad[0, 1, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(bad)


def test_decode_from_stored_bytes():
    x = np.random.default_rng(1).standard_normal((1, 4, 6)).astype(np.float32)
    q, s = quantize_int8(x)
    tokens = decode_tokens(q.tobytes(), s.astype("<f4").tobytes(), 4, 6)
    assert np.allclose(tokens, dequantize_int8(q, s)[0])
