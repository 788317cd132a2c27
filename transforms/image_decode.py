"""Safe image decoding: size checked from the header before pixels are decoded, odd but valid
modes (CMYK, 16-bit, palette, alpha, animated) normalised to 8-bit RGB."""
import io
import re
import warnings

import numpy as np
from PIL import Image

# Formats we accept whatever the member's extension says; others (EPS via Ghostscript, ...) never run.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own MAX_IMAGE_PIXELS


class DecodeError(Exception):
    pass


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """bytes -> 8-bit RGB PIL image (first frame if animated). Raises DecodeError."""
    if not data:
        raise DecodeError("empty image member (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = im.size
            if width * height > max_pixels:
                raise DecodeError(f"decompression bomb refused: {width}x{height} exceeds {max_pixels} pixels")
            if width < 1 or height < 1:
                raise DecodeError(f"degenerate size {width}x{height}")
            im.seek(0)
            im.load()
            return _to_rgb(im)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb refused: {e}") from e
    except Exception as e:  # Pillow raises many types for broken data
        # Drop object addresses ("<_io.BytesIO object at 0x7f...>"): failure records must be
        # byte-identical from run to run.
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))
        raise DecodeError(f"undecodable image ({type(e).__name__}: {detail})") from e
