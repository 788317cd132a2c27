"""Drawing the scenes benchmark's groups (four minimal variants each), shards and queries.

pipeline/make_scenes.py is its command line and documents the benchmark.
"""
import io
import json
import random
import tarfile
from dataclasses import replace
from typing import List, Optional, Tuple

from schemas import storage
from scenes.captions import TEMPLATES, caption
from scenes.render import draw_jitter, layout, render_png
from scenes.vocabulary import COLORS, INVERSE, RELATIONS, SHAPES, SIZE_IN_CAPTION, SIZES, Obj, Scene, \
    scene_signature, split_of


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


def queries_for(samples) -> List[dict]:
    """One query per (key, caption, scene graph), in order. Its ``relevant`` lists every key whose
    image the caption is true for: the same scene drawn again (other jitter) and, for a caption
    without sizes, the same scene at other sizes."""
    out, answers = [], {}
    for key, text, graph in samples:
        shows = {scene_signature(graph["objects"], graph["relation"], w) for w in (True, False)}
        for sig in shows:
            answers.setdefault(sig, []).append(key)
        out.append(({"query_id": key, "text": text, "relevant": [key], "group": graph["group"],
                     "variant": graph["variant"]},
                    scene_signature(graph["objects"], graph["relation"], graph["sizes_in_caption"])))
    for q, signature in out:
        q["relevant"] = sorted(answers[signature])
    return [q for q, _ in out]
