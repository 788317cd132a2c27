"""Rerank speed against the number of stored image tokens: the demo checkpoint's joint encoder
(the scorer the rerank job runs) over the same 3-object captions with m image tokens each.

    HF_HUB_OFFLINE=1 python -m bench.token_count [--tokens 16,25,36,64] [--pairs 1280] [--repeats 3]

One thread, batch 64, 20 candidates per caption (a rerank batch holds about three queries). The
token values do not change the work, so they are drawn at random; each m is timed in turn,
round after round, and the best round is kept, so drift on a shared machine cancels out in the
ratios. Prints one JSON object: pairs/s per m and each m's speed relative to the first.
"""
import argparse
import json
import sys
import time

import numpy as np
import torch

from models.checkpoint import load_scorer
from models.joint_encoder import score_batch
from scenes.generate import generate

BATCH = 64
CANDIDATES = 20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded one)")
    ap.add_argument("--tokens", default="16,25,36,64", help="image token counts, comma-separated")
    ap.add_argument("--pairs", type=int, default=1280, help="pairs scored per timing")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over every m (the best is kept)")
    args = ap.parse_args(argv)
    counts = [int(m) for m in args.tokens.split(",")]
    torch.set_num_threads(1)
    model, tokenizer, cfg, _ = load_scorer(args.checkpoint, "cpu", "fp32")
    width = cfg.adapter.output_dim
    captions = [text for _, _, text, _ in generate("test", args.pairs // CANDIDATES, seed=5, n_objects=3)]
    texts = [captions[i // CANDIDATES % len(captions)] for i in range(args.pairs)]
    rng = np.random.default_rng(0)
    tokens = {m: rng.standard_normal((args.pairs, m, width), dtype=np.float32) / np.sqrt(width) for m in counts}
    best = {m: float("inf") for m in counts}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for m in counts:
                t = time.perf_counter()
                for i in range(0, args.pairs, BATCH):
                    score_batch(model, tokenizer, texts[i:i + BATCH], tokens[m][i:i + BATCH])
                best[m] = min(best[m], time.perf_counter() - t)
    speed = {m: args.pairs / best[m] for m in counts}
    json.dump({"checkpoint": args.checkpoint or "embedded", "threads": 1, "batch": BATCH,
               "pairs_per_s": {str(m): round(speed[m], 1) for m in counts},
               "relative_to_first": {str(m): round(speed[m] / speed[counts[0]], 3) for m in counts}},
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
