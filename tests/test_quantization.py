import numpy as np
import pytest

from schemas.quantization import decode_tokens, dequantize_int8, quantize_int8


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


# ---------------------------------------------------------------- int4_absmax_channel_token
from schemas.quantization import (INT4, INT8, SCHEMES, UnknownSchemeError, dequantize_int4, get_scheme,  # noqa: E402
                                 pack_int4, quantize_int4, scheme_for_cli, unpack_int4)
from schemas.token_store import token_schema  # noqa: E402


def outlier_tokens(seed=0, shape=(4, 64, 384)):
    """Gaussian tokens with a few loud channels and tokens of different norms, like adapter outputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x *= rng.uniform(0.2, 2, (shape[0], 1, shape[2])).astype(np.float32)
    x[:, :, rng.choice(shape[2], 6, replace=False)] *= 12
    return x * rng.uniform(0.05, 5, (shape[0], shape[1], 1)).astype(np.float32)


def test_int4_error_is_within_half_a_step_and_close_to_the_input():
    x = outlier_tokens()
    q, channel, token = quantize_int4(x)
    assert q.dtype == np.int8 and q.min() >= -7 and q.max() <= 7
    assert channel.dtype == np.float16 and channel.shape == (4, 384) and token.shape == (4, 64)
    step = token.astype(np.float32)[:, :, None] * channel.astype(np.float32)[:, None, :]
    deq = dequantize_int4(q, channel, token)
    err = np.abs(deq - x)
    assert (err <= step * (0.5 + 1e-5)).all()
    # scales are rounded up, never down: nothing is clipped, each token uses the full range
    assert (channel.astype(np.float32) >= np.abs(x).max(axis=1)).all()
    assert (np.abs(q).max(axis=-1) == 7).all()
    cos = (deq * x).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(deq, axis=-1)
    assert cos.mean() > 0.985 and cos.min() > 0.9
    rel = np.linalg.norm(deq - x) / np.linalg.norm(x)
    assert rel < 0.13
    # why per-channel scales: int4 with one absmax scale per token loses the quiet channels
    per_token = np.abs(x).max(-1, keepdims=True) / 7
    assert np.linalg.norm(np.clip(np.rint(x / per_token), -7, 7) * per_token - x) / np.linalg.norm(x) > 1.5 * rel


def test_int4_bytes_per_image_at_64_x_384():
    s = get_scheme(INT4)
    assert s.token_bytes(64, 384) == 12288 and s.scale_bytes(64, 384) == (384 + 64) * 2
    assert s.row_bytes(64, 384) == 13184 <= 13 * 1024
    assert get_scheme(INT8).row_bytes(64, 384) == 24576 + 256
    schema = token_schema(64, 384, 512, INT4)
    assert schema.field("tokens").type.byte_width + schema.field("token_scales").type.byte_width == 13184
    tok, sc = s.encode(outlier_tokens(shape=(2, 64, 384)))
    assert tok.shape == (2, 12288) and sc.shape == (2, 896) and tok.dtype == sc.dtype == np.uint8


def test_int4_packing_round_trip_and_odd_sizes():
    rng = np.random.default_rng(3)
    q = rng.integers(-7, 8, size=(3, 5, 7)).astype(np.int8)  # 35 values: the last byte is padded
    packed = pack_int4(q)
    assert packed.shape == (3, 18)
    assert (packed[:, -1] >> 4 == 8).all()  # padding is a zero (8 - 8)
    np.testing.assert_array_equal(unpack_int4(packed, 35).reshape(3, 5, 7), q)
    assert pack_int4(np.array([[1, -2]], np.int8)).tolist() == [[(1 + 8) | ((-2 + 8) << 4)]]  # low nibble first
    x = rng.standard_normal((2, 5, 7)).astype(np.float32)
    s = get_scheme(INT4)
    tok, sc = s.encode(x)
    np.testing.assert_array_equal(s.decode(tok, sc, 5, 7), dequantize_int4(*quantize_int4(x)))


def test_int4_zeros_tiny_values_and_rejections():
    x = np.zeros((1, 4, 8), np.float32)
    x[0, 1, 2] = 3.0  # one non-zero token, one non-zero channel
    q, channel, token = quantize_int4(x)
    deq = dequantize_int4(q, channel, token)
    assert (deq[x == 0] == 0).all() and abs(deq[0, 1, 2] - 3.0) < 3e-3  # zeros stay exact
    tiny = outlier_tokens(1, (2, 8, 16)) * np.float32(1e-9)  # float16 subnormal scales
    q, channel, token = quantize_int4(tiny)
    step = token.astype(np.float32)[:, :, None] * channel.astype(np.float32)[:, None, :]
    assert (np.abs(dequantize_int4(q, channel, token) - tiny) <= step * (0.5 + 1e-5)).all()
    for bad, match in ((np.nan, "non-finite"), (np.inf, "non-finite"), (1e6, "float16 range")):
        y = np.ones((1, 2, 8), np.float32)
        y[0, 1, 3] = bad
        with pytest.raises(ValueError, match=match):
            quantize_int4(y)
        with pytest.raises(ValueError, match=match):
            get_scheme(INT4).encode(y)


def test_int4_is_deterministic_and_decodes_from_stored_bytes():
    x = outlier_tokens(2, (3, 16, 384))
    s = get_scheme(INT4)
    a, b = s.encode(x), s.encode(x.copy())
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    tokens = decode_tokens(a[0][1].tobytes(), a[1][1].tobytes(), 16, 384, INT4)
    np.testing.assert_array_equal(tokens, dequantize_int4(*quantize_int4(x))[1])
    with pytest.raises(ValueError, match="do not fit"):
        decode_tokens(a[0][1].tobytes(), a[1][1].tobytes(), 16, 384, INT8)


def test_int8_through_the_scheme_is_bit_identical_to_the_old_path():
    x = outlier_tokens(4, (2, 16, 384))
    q, s = quantize_int8(x)
    tok, sc = get_scheme(INT8).encode(x)
    assert tok.tobytes() == q.tobytes() and sc.tobytes() == s.astype("<f4").tobytes()
    np.testing.assert_array_equal(get_scheme(INT8).decode(tok, sc, 16, 384), dequantize_int8(q, s))
    np.testing.assert_array_equal(decode_tokens(q[0].tobytes(), s[0].tobytes(), 16, 384), dequantize_int8(q, s)[0])


def test_scheme_names():
    assert set(SCHEMES) == {INT8, INT4}
    assert scheme_for_cli("int8") == INT8 and scheme_for_cli("int4") == INT4 and scheme_for_cli(INT4) == INT4
    assert get_scheme(INT8).manifest_entry() == {  # what every store before int4 has in its manifest
        "scheme": "int8_absmax_per_token", "dtype": "int8", "granularity": "token",
        "scale_dtype": "float32", "embedding_dtype": "float16"}
    for name in ("int3", None, "INT8_absmax_per_token"):
        with pytest.raises(UnknownSchemeError, match="unknown quantization scheme"):
            get_scheme(name)
