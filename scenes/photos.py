"""Demo shards of real photos (the ones scikit-image ships, no download): crops, captions, tars.

pipeline/make_demo_shards.py is its command line; tests and benchmarks build their shards here.
"""
import io
import json

import numpy as np
import webdataset as wds
from PIL import Image

# scikit-image's bundled photos (they load without a download), with a caption each.
PHOTOS = {
    "astronaut": "an astronaut in a white space suit in front of a flag",
    "chelsea": "a tabby cat looking to the side",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on a launch pad",
    "camera": "a man with a camera on a tripod",
    "coins": "old coins on a dark background",
    "moon": "the surface of the moon",
    "colorwheel": "a colour wheel",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "hubble_deep_field": "galaxies in deep space",
    "brick": "a brick wall",
    "grass": "a patch of grass",
    "gravel": "gravel on the ground",
    "clock": "a clock on a wall",
    "page": "a page of printed text",
    "text": "handwritten text",
}
FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))


def load_photo(name: str) -> Image.Image:
    import skimage.data
    a = getattr(skimage.data, name)()
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    return Image.fromarray(a).convert("RGB")


def demo_samples(shard: int, count: int, seed: int = 0, formats=FORMATS):
    """Yields webdataset sample dicts for one shard: crops of the photos, cycling through them,
    stored in ``formats`` in turn ((extension, PIL format) pairs; default jpg, png, webp)."""
    rng = np.random.default_rng([seed, shard])
    names = sorted(PHOTOS)
    cache = {}
    for i in range(count):
        name = names[(shard * count + i) % len(names)]
        photo = cache.setdefault(name, load_photo(name))
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        ext, fmt = formats[i % len(formats)]
        buf = io.BytesIO()
        crop.save(buf, format=fmt)
        key = f"{shard:05d}{i:04d}"
        yield {"__key__": key, ext: buf.getvalue(), "txt": PHOTOS[name].encode(),
               "json": json.dumps({"key": key, "photo": name, "crop": [x, y, cw, ch]}).encode()}


def write_shard(path: str, samples) -> None:
    with wds.TarWriter(path) as sink:
        for sample in samples:
            sink.write(sample)
