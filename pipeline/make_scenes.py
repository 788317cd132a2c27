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
import json
import re

from pipeline._cli import add_filesystem_flags, apply_filesystem_flags
from scenes.generate import generate, queries_for, write_shard
from schemas import storage


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
    storage.make_dirs(output)
    names = {f"{s:05d}.tar" for s in range(shards)}
    stale = sorted(f for f in map(storage.basename, storage.list_dir(output))
                   if re.fullmatch(r"\d{5}\.tar", f) and f not in names)
    if stale:
        raise SystemExit(f"error: {args.output} already holds other shards ({', '.join(stale[:3])}, ...); "
                         f"use an empty --output")

    samples = generate(args.split, args.n, args.seed, args.image_size, args.objects)
    written = []
    for s in range(shards):
        batch = [next(samples) for _ in range(min(per_shard, groups * 4 - s * per_shard))]
        write_shard(storage.join(output, f"{s:05d}.tar"), batch)
        written += [(key, text, graph) for key, _, text, graph in batch]
    storage.write_bytes_atomic(storage.join(output, "queries.jsonl"),
                               "".join(json.dumps(q) + "\n" for q in queries_for(written)).encode("utf-8"))
    summary = {"split": args.split, "samples": groups * 4, "groups": groups, "shards": shards,
               "output": args.output}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
