import io

import numpy as np
import pytest
from PIL import Image

from transforms.image_decode import DecodeError, decode_image


def encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("make", [
    lambda: encode(Image.new("CMYK", (20, 10), (0, 255, 0, 0)), "JPEG"),
    lambda: encode(Image.fromarray(np.full((10, 20), 40000, np.uint16)), "PNG"),
    lambda: encode(Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"),
    lambda: encode(Image.new("P", (20, 10)), "GIF", transparency=0),
    lambda: encode(Image.new("L", (1, 1), 7), "BMP"),
    lambda: encode(Image.new("LA", (20, 10)), "PNG"),
    lambda: encode(Image.new("RGB", (20, 10), "blue"), "WEBP"),
    lambda: encode(Image.new("RGB", (20, 10), "blue"), "TIFF"),
])
def test_odd_but_valid_modes_decode_to_rgb(make):
    im = decode_image(make())
    assert im.mode == "RGB" and im.size[0] >= 1


def test_alpha_is_composited_on_white_and_16_bit_is_scaled():
    assert decode_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG")).getpixel((0, 0)) == (255, 255, 255)
    px = decode_image(encode(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG")).getpixel((0, 0))
    assert px == (255, 255, 255)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and b < 50


def test_bad_bytes_and_bombs_are_refused():
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(DecodeError, match="undecodable"):
        decode_image(b"\xff\xd8\xff\xe0garbage" * 10)
    jpeg = encode(Image.new("RGB", (64, 64), "red"), "JPEG")
    with pytest.raises(DecodeError):
        decode_image(jpeg[: len(jpeg) // 2] + b"\x00" * 10)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(encode(Image.new("RGB", (200, 100)), "PNG"), max_pixels=10_000)
    # A real bomb: ~90 MP of 1-bit pixels packs into a tiny PNG; refused from its header.
    bomb = encode(Image.new("1", (10_000, 9_000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(bomb)
