"""Writes small WebDataset shards of real photos (the ones scikit-image ships), offline.

    python -m pipeline.make_demo_shards --output DIR [--shards 3] [--per_shard 24]

Each sample is a crop of one photo (deterministic), stored as ``.jpg``/``.png``/``.webp`` with a
``.txt`` caption and ``.json`` metadata, keyed like img2dataset output (``SSSSSIIII``). Also writes
``DIR/queries.jsonl``: one query per photo (its caption), ``relevant`` = the keys of its crops.
"""
import argparse
import json
import os

from scenes.photos import PHOTOS, demo_samples, write_shard


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
