"""Writes small WebDataset shards of real photos (the ones scikit-image ships), offline.

    python -m pipeline.make_demo_shards --output DIR [--shards 3] [--per_shard 24]

Each sample is a crop of one photo (deterministic), stored as ``.jpg``/``.png``/``.webp`` with a
``.txt`` caption and ``.json`` metadata, keyed like img2dataset output (``SSSSSIIII``). Also writes
``DIR/queries.jsonl``: one query per photo (its caption), ``relevant`` = the keys of its crops.
"""
import argparse
import io
import json
import os

import numpy as np
import webdataset as wds
from PIL import Image

# scikit-image photos that load without a download (FACTS.md), with a caption each.
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.make_demo_shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="directory for NNNNN.tar shards and queries.jsonl")
    ap.add_argument("--shards", type=int, default=3, help="number of shards")
    ap.add_argument("--per_shard", type=int, default=24, help="samples per shard")
    ap.add_argument("--seed", type=int, default=0, help="seed of the crops (the same seed, the same shards)")
    args = ap.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    relevant = {}
    for s in range(args.shards):
        samples = list(demo_samples(s, args.per_shard, args.seed))
        write_shard(os.path.join(args.output, f"{s:05d}.tar"), samples)
        for sample in samples:
            relevant.setdefault(json.loads(sample["json"])["photo"], []).append(sample["__key__"])
    with open(os.path.join(args.output, "queries.jsonl"), "w") as f:
        for name in sorted(relevant):
            f.write(json.dumps({"query_id": name, "text": PHOTOS[name], "relevant": relevant[name]}) + "\n")
    print(f"wrote {args.shards} shards x {args.per_shard} samples and {len(relevant)} queries to {args.output}")


if __name__ == "__main__":
    main()
