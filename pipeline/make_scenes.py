"""The compositional scenes benchmark: attribute binding and spatial relations, as WebDataset shards.

    python -m pipeline.make_scenes --split train|test --n N --seed S --output DIR \\
        [--per_shard 1000] [--image_size 64] [--objects 2]

What it measures. Separate image and text embeddings (CLIP style) are weak at *binding*
("a red circle and a blue square" vs "a blue circle and a red square") and *relations*
("left of" vs "right of"), in the style of Winoground and ARO; a joint encoder that reads
text and image together should fix both. Every scene is therefore one of a group of four
minimal variants that share every word-level ingredient:

    v0  the original              "a red circle left of a blue square"
    v1  colours of objects 0 and 1 swapped       "a blue circle left of a red square"
    v2  relation reversed (positions swapped)    "a red circle right of a blue square"
    v3  one attribute changed: one object's colour or shape replaced by one not in the scene

Each variant's caption is true for it and false for the other three (objects in a scene have
distinct shapes and distinct colours, so a colour+shape mention names exactly one object).
Retrieval queries are the captions, with the true image(s) relevant; the other three images
of the group are the hard negatives, in both splits (train uses them for training).

Scenes. ``--objects`` (2 or 3) non-overlapping objects on a plain dark background, drawn with
PIL ImageDraw: shapes circle, square, triangle, star, cross, diamond; colours red, green, blue,
yellow, purple, orange, white, cyan; sizes small, large. The relation is between object 0 and
object 1 (left of / right of / above / below); a third object sits below the pair (horizontal
relations) or to its right (vertical ones). Positions and radii carry a small seeded jitter,
shared by the four variants of a group so that they differ only by the stated change.
Captions come from 8 templates (one per group), with sizes in about 40% of groups (always
true when present); with 3 objects all three are mentioned.

Splits never share a scene. A scene's class key (the unordered pair of object-0/1 (size, shape),
their unordered colours, the relation's axis, and object 2) is the same for v0, v1 and v2; the
class is in ``test`` when sha256(key) % 10 == 0, else in ``train``. A group is drawn until v0
falls in the requested split, and v3's change is picked among those whose own class does too.
So the split is a function of each scene's content: no scene (``scene_signature``: shapes,
colours, sizes, relation, ignoring jitter) can appear in both splits, whatever the seeds.

Output. ``DIR/00000.tar``, ``00001.tar``, ... with ``--per_shard`` samples each (rounded down to
a multiple of 4: groups are never split), members ``KEY.json``, ``KEY.png`` (RGB, image_size
square), ``KEY.txt`` (caption), KEY = ``{split}{group:06d}v{variant}``; ``.json`` is the scene
graph ``{split, group, variant, objects: [{shape, color, size, x, y, r}], relation, caption}``
(x, y: centre and r: radius, in pixels; relation: object 0 relative to object 1).
``DIR/queries.jsonl``: one query per sample ``{query_id, text, relevant, group, variant}``; ``relevant``
lists every key of the split whose image the caption is true for: the same objects and relation
(other jitter), and the same sizes only where the caption names sizes (``sizes_in_caption`` in
the scene graph); a caption without sizes is true for a scene of other sizes too.
N is rounded up to a multiple of 4. The same arguments give byte-identical files (stdlib
tarfile, mtime 0, uid/gid 0, fixed member order, fixed PNG settings); different seeds give
different scenes. A one-line JSON summary goes to stdout.
"""
import argparse
import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

from pipeline._cli import add_filesystem_flags, apply_filesystem_flags
from schemas import storage

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {"red": (230, 25, 25), "green": (30, 190, 50), "blue": (40, 80, 255), "yellow": (250, 225, 30),
          "purple": (150, 50, 210), "orange": (255, 135, 0), "white": (245, 245, 245), "cyan": (0, 215, 225)}
SIZES = {"small": 0.09, "large": 0.15}  # radius as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND = (22, 22, 26)
TEST_BUCKETS = 10  # sha256(class key) % 10 == 0 -> test
SIZE_IN_CAPTION = 0.4


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str

    def phrase(self, with_size: bool) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


Scene = Tuple[Tuple[Obj, ...], str]  # (objects, relation of object 0 to object 1)


# --- splits -------------------------------------------------------------------------------------

def scene_signature(objects, relation: str, with_size: bool = True) -> str:
    """Canonical description of a scene, ignoring jitter: 'B right of A' is written 'A left of B'.
    ``with_size`` False leaves the sizes out: what a caption that names no size says.

    Accepts Obj instances or the scene graph's object dicts.
    """
    objs = [o if isinstance(o, Obj) else Obj(o["shape"], o["color"], o["size"]) for o in objects]
    if relation in ("right of", "below"):
        objs[0], objs[1], relation = objs[1], objs[0], INVERSE[relation]
    words = [o.phrase(with_size) for o in objs]
    return " | ".join([f"{words[0]} {relation} {words[1]}", *words[2:]])


def class_key(objects, relation: str) -> str:
    """The part of a scene that colour swaps (v1) and relation reversal (v2) leave unchanged."""
    a, b, *rest = objects
    axis = "horizontal" if relation in ("left of", "right of") else "vertical"
    return "|".join([*sorted([f"{a.size} {a.shape}", f"{b.size} {b.shape}"]), *sorted([a.color, b.color]),
                     axis, *(o.phrase(True) for o in rest)])


def split_of(objects, relation: str) -> str:
    """'test' or 'train': a stable function of the scene's content."""
    digest = hashlib.sha256(class_key(objects, relation).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


# --- groups -------------------------------------------------------------------------------------

def draw_group(rng: random.Random, split: str, n_objects: int) -> List[Scene]:
    """Draws the four variants (v0..v3) of one group, all in ``split``."""
    while True:
        shapes, colors = rng.sample(SHAPES, n_objects), rng.sample(sorted(COLORS), n_objects)
        objs = tuple(Obj(s, c, rng.choice(sorted(SIZES))) for s, c in zip(shapes, colors))
        relation = rng.choice(RELATIONS)
        if split_of(objs, relation) != split:
            continue
        changed = _changed_attribute(rng, objs, relation, split)
        if changed is None:
            continue
        a, b = objs[0], objs[1]
        swapped = (replace(a, color=b.color), replace(b, color=a.color), *objs[2:])
        return [(objs, relation), (swapped, relation), (objs, INVERSE[relation]), (changed, relation)]


def _changed_attribute(rng, objs, relation, split) -> Optional[Tuple[Obj, ...]]:
    """v3: one object's colour or shape replaced by one not in the scene, staying in ``split``."""
    used_colors, used_shapes = {o.color for o in objs}, {o.shape for o in objs}
    options = [(i, "color", c) for i in range(len(objs)) for c in sorted(COLORS) if c not in used_colors]
    options += [(i, "shape", s) for i in range(len(objs)) for s in SHAPES if s not in used_shapes]
    rng.shuffle(options)
    for i, field, value in options:
        changed = tuple(replace(o, **{field: value}) if j == i else o for j, o in enumerate(objs))
        if split_of(changed, relation) == split:
            return changed
    return None


# --- layout and drawing -------------------------------------------------------------------------

def draw_jitter(rng: random.Random, n_objects: int) -> dict:
    """Per-group jitter (fractions of the image side), shared by the group's four variants:
    position offsets per slot, radius scale per object."""
    return {"along": [rng.uniform(-0.04, 0.04) for _ in range(n_objects)],
            "across": [rng.uniform(-0.08 if n_objects == 2 else -0.04, 0.08 if n_objects == 2 else 0.04)
                       for _ in range(n_objects)],
            "scale": [rng.uniform(0.9, 1.1) for _ in range(n_objects)]}


def layout(objs, relation: str, jitter: dict, image_size: int) -> List[Tuple[float, float, float]]:
    """(x, y, r) in pixels per object. Slots: first/second along the relation's axis, then object 2."""
    horizontal = relation in ("left of", "right of")
    line = 0.5 if len(objs) == 2 else 0.28  # the pair's row (or column); object 2 sits at 0.74
    slots = [(0.27, line), (0.73, line), (0.5, 0.74)]
    order = [0, 1, 2] if relation in ("left of", "above") else [1, 0, 2]
    out = []
    for i, obj in enumerate(objs):
        slot = order[i]  # jitter belongs to the slot, so v2 swaps exact positions
        along, across = slots[slot][0] + jitter["along"][slot], slots[slot][1] + jitter["across"][slot]
        x, y = (along, across) if horizontal else (across, along)
        r = SIZES[obj.size] * jitter["scale"][i]
        out.append((round(x * image_size, 2), round(y * image_size, 2), round(r * image_size, 2)))
    return out


def _polygon(x, y, r, n, inner=None, start=-90.0):
    """Regular polygon (or star with an inner radius) around (x, y), first vertex at ``start`` degrees."""
    pts, step = [], 360.0 / n
    for k in range(n):
        a = math.radians(start + k * step)
        pts.append((x + r * math.cos(a), y + r * math.sin(a)))
        if inner is not None:
            b = math.radians(start + (k + 0.5) * step)
            pts.append((x + inner * r * math.cos(b), y + inner * r * math.sin(b)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill) -> None:
    """Every shape fits in the circle of radius r around (x, y) and covers its centre."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        h = r * 0.8
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(x, y, r, 3), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(x, y, r, 5, inner=0.45), fill=fill)
    elif shape == "cross":
        w = r * 0.32
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_png(objs, placed, image_size: int) -> bytes:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj, (x, y, r) in zip(objs, placed):
        draw_shape(draw, obj.shape, x, y, r, COLORS[obj.color])
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


# --- captions -----------------------------------------------------------------------------------

LONG = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NEAR = {"left of": "to its left", "right of": "to its right", "above": "above it", "below": "below it"}
ENDS = {"left of": ("on the left", "on the right"), "above": ("at the top", "at the bottom")}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# Each template gets (a, b, rel): phrases of objects 0 and 1 (no article), relation of 0 to 1.
TEMPLATES = (
    lambda a, b, rel: f"{_a(a)} {rel} {_a(b)}",
    lambda a, b, rel: f"{_a(b)} {LONG[INVERSE[rel]]} {_a(a)}",
    lambda a, b, rel: f"{_a(a)} is {LONG[rel]} {_a(b)}",
    lambda a, b, rel: (f"{ENDS[rel][0]} {_a(a)}, {ENDS[rel][1]} {_a(b)}" if rel in ENDS
                       else f"{ENDS[INVERSE[rel]][0]} {_a(b)}, {ENDS[INVERSE[rel]][1]} {_a(a)}"),
    lambda a, b, rel: f"there is {_a(a)} and, {NEAR[INVERSE[rel]]}, {_a(b)}",
    lambda a, b, rel: f"{_a(b)} with {_a(a)} {NEAR[rel]}",
    lambda a, b, rel: f"the {b} is {LONG[INVERSE[rel]]} the {a}",
    lambda a, b, rel: f"a picture of {_a(a)} {LONG[rel]} {_a(b)}",
)


def caption(objs, relation: str, template: int, with_size: bool, third_side: bool) -> str:
    """The caption of a scene; ``third_side`` also states where object 2 is (below / right of the pair)."""
    a, b, *rest = (o.phrase(with_size) for o in objs)
    text = TEMPLATES[template](a, b, relation)
    for c in rest:
        side = "below" if relation in ("left of", "right of") else "to the right of"
        text += f", and {_a(c)} {side} them" if third_side else f", and {_a(c)}"
    return text


# --- output -------------------------------------------------------------------------------------

def generate(split: str, n: int, seed: int, image_size: int = 64, n_objects: int = 2):
    """Yields (key, png bytes, caption, scene graph) for ceil(n / 4) groups, in key order."""
    if split not in ("train", "test") or n_objects not in (2, 3):
        raise ValueError("split must be train or test, objects 2 or 3")
    rng = random.Random(f"make_scenes|{split}|{seed}|{n_objects}")
    for group in range((n + 3) // 4):
        variants = draw_group(rng, split, n_objects)
        jitter = draw_jitter(rng, n_objects)
        template, with_size = rng.randrange(len(TEMPLATES)), rng.random() < SIZE_IN_CAPTION
        third_side = rng.random() < 0.5
        for v, (objs, relation) in enumerate(variants):
            placed = layout(objs, relation, jitter, image_size)
            text = caption(objs, relation, template, with_size, third_side)
            graph = {"split": split, "group": group, "variant": v,
                     "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "x": x, "y": y, "r": r}
                                 for o, (x, y, r) in zip(objs, placed)],
                     "relation": relation, "caption": text, "sizes_in_caption": with_size}
            yield f"{split}{group:06d}v{v}", render_png(objs, placed, image_size), text, graph


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples) -> None:
    """One tar, members in the given sample order, each sample's members sorted by extension
    (built in memory, a few MB, then written whole: a local path or an object-store URL)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, png, text, graph in samples:
            _add(tar, f"{key}.json", json.dumps(graph).encode())
            _add(tar, f"{key}.png", png)
            _add(tar, f"{key}.txt", text.encode())
    storage.write_bytes_atomic(path, buf.getvalue())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.make_scenes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True, choices=["train", "test"],
                    help="which split's scenes to draw (the two never share a scene)")
    ap.add_argument("--n", type=int, required=True, help="number of samples, rounded up to a multiple of 4")
    ap.add_argument("--seed", type=int, required=True,
                    help="scene stream seed (different seeds, different scenes)")
    ap.add_argument("--output", required=True, help="directory for NNNNN.tar shards and queries.jsonl "
                    "(local, or a gs://, s3:// URL)")
    ap.add_argument("--per_shard", type=int, default=1000,
                    help="samples per shard, rounded down to a multiple of 4 (at least 4)")
    ap.add_argument("--image_size", type=int, default=64, help="side of the square RGB images, pixels")
    ap.add_argument("--objects", type=int, default=2, choices=[2, 3], help="objects per scene")
    fs_flags = add_filesystem_flags(ap)
    args = ap.parse_args(argv)
    apply_filesystem_flags(args, fs_flags)
    if args.n < 1 or args.image_size < 16:
        ap.error("--n must be >= 1 and --image_size >= 16")

    groups = (args.n + 3) // 4
    per_shard = max(4, args.per_shard - args.per_shard % 4)
    shards = (groups * 4 + per_shard - 1) // per_shard
    output = args.output.rstrip("/")
    if "://" not in output:
        os.makedirs(output, exist_ok=True)
    names = {f"{s:05d}.tar" for s in range(shards)}
    stale = sorted(f for f in map(storage.basename, storage.list_dir(output))
                   if re.fullmatch(r"\d{5}\.tar", f) and f not in names)
    if stale:
        raise SystemExit(f"error: {args.output} already holds other shards ({', '.join(stale[:3])}, ...); "
                         f"use an empty --output")

    samples = generate(args.split, args.n, args.seed, args.image_size, args.objects)
    queries = []
    for s in range(shards):
        batch = [next(samples) for _ in range(min(per_shard, groups * 4 - s * per_shard))]
        write_shard(storage.join(output, f"{s:05d}.tar"), batch)
        queries += [{"query_id": key, "text": text, "relevant": [key], "group": graph["group"],
                     "variant": graph["variant"],
                     "signature": scene_signature(graph["objects"], graph["relation"], with_size),
                     "shows": {scene_signature(graph["objects"], graph["relation"], w) for w in (True, False)}}
                    for key, _, text, graph in batch
                    for with_size in [graph["sizes_in_caption"]]]
    # Every image the caption is true for answers it: the same scene drawn again (other jitter) and,
    # for a caption without sizes, the same scene at other sizes.
    answers = {}
    for q in queries:
        for sig in q["shows"]:
            answers.setdefault(sig, []).append(q["query_id"])
    for q in queries:
        q["relevant"] = sorted(answers[q["signature"]])
        del q["signature"], q["shows"]
    storage.write_bytes_atomic(storage.join(output, "queries.jsonl"),
                               "".join(json.dumps(q) + "\n" for q in queries).encode("utf-8"))
    summary = {"split": args.split, "samples": groups * 4, "groups": groups, "shards": shards,
               "output": args.output}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
