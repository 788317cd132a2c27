"""Probes: what a checkpoint's visual tokens hold about the scenes (colour, shape, where things are).

    python -m bench.probe_tokens --checkpoint RUN/checkpoint --scenes 'scenes/test/*.tar' [--json_out F]

Linear (logistic regression) probes, 80/20 split by scene group, features standardised. The
scene graphs (``.json``) serve as probe labels only; no model reads them.
- ``patch_colour`` / ``patch_shape``: an object's colour / shape from the backbone's patch token at
  the object's centre (``*_3x3``: with the mean of the 3x3 neighbourhood appended);
- ``relation_*``: for scenes with a horizontal (vertical) relation, whether the object whose colour
  comes first alphabetically is the left (upper) one, from all patch tokens, from all adapter
  tokens, and from the pooled embedding (chance 50%);
- ``adapter_colour_at_cell``: for each adapter token of a cell grid, which colour covers most of
  that cell (background included), when the adapter's tokens form a grid (num_tokens square);
- ``object{k}_{color,shape}_{pooled,adapter_tokens}``: object k's colour / shape from the pooled
  embedding (the first stage's) and from all adapter tokens; k = 2 is the third object of 3-object
  scenes (chance 1/8 for colour, 1/6 for shape).
"""
import argparse
import json
import math

import numpy as np
import torch

from models.checkpoint import load_vision_encoder
from scenes.vocabulary import COLORS
from training.scenes import load_scenes


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy (%) of a logistic regression on x -> y, split 80/20 by group."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    keys = np.unique(groups)
    rng = np.random.default_rng(seed)
    test_groups = set(rng.choice(keys, size=max(1, len(keys) // 5), replace=False).tolist())
    test = np.array([g in test_groups for g in groups])
    if len(np.unique(y[~test])) < 2:
        return float("nan")
    scaler = StandardScaler().fit(x[~test])
    clf = LogisticRegression(max_iter=300, C=0.5).fit(scaler.transform(x[~test]), y[~test])
    return round(100 * float((clf.predict(scaler.transform(x[test])) == y[test]).mean()), 1)


def scene_graphs(pattern: str):
    from training.scenes import training_shards
    from schemas import storage
    from transforms.tar_samples import iter_samples
    graphs = {}
    for path in training_shards(pattern):
        with storage.open_read(path) as f:
            for s in iter_samples(f):
                graphs[s.key] = json.loads(s.members["json"])
    return graphs


@torch.no_grad()
def features(checkpoint: str, pattern: str, limit: int):
    encoder, cfg, _ = load_vision_encoder(checkpoint)
    data = load_scenes(pattern, encoder.backbone.image_transform(), limit)
    patch, tokens, pooled = [], [], []
    for i in range(0, len(data["keys"]), 256):
        emb, p = encoder.backbone(data["images"][i:i + 256])
        patch.append(p.float()), pooled.append(emb.float()), tokens.append(encoder.adapter(p).float())
    graphs = scene_graphs(pattern)
    return (data, [graphs[k] for k in data["keys"]], torch.cat(patch).numpy(), torch.cat(tokens).numpy(),
            torch.cat(pooled).numpy(), encoder.backbone.image_size, encoder.backbone.preprocess_cfg)


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--scenes", required=True, help="scene shards (pipeline.make_scenes)")
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args(argv)
    data, graphs, patch, tokens, pooled, image_size, pp = features(args.checkpoint, args.scenes, args.limit)
    size = image_size[0] if isinstance(image_size, tuple) else image_size
    n, n_patch, _ = patch.shape
    grid = math.isqrt(n_patch)
    groups = data["groups"]
    out = {"checkpoint": args.checkpoint, "images": n, "patch_grid": grid, "num_tokens": tokens.shape[1]}

    # per object: the patch under its centre
    rows, rows3, colours, shapes, obj_groups = [], [], [], [], []
    for i, g in enumerate(graphs):
        cells = patch[i].reshape(grid, grid, -1)
        for o in g["objects"]:
            cx = min(grid - 1, int(o["x"] / size * grid))
            cy = min(grid - 1, int(o["y"] / size * grid))
            near = cells[max(0, cy - 1):cy + 2, max(0, cx - 1):cx + 2].reshape(-1, cells.shape[-1]).mean(0)
            rows.append(cells[cy, cx]), rows3.append(np.concatenate([cells[cy, cx], near]))
            colours.append(o["color"]), shapes.append(o["shape"]), obj_groups.append(groups[i])
    rows, rows3, obj_groups = np.stack(rows), np.stack(rows3), np.array(obj_groups)
    colours, shapes = np.array(colours), np.array(shapes)
    out["patch_colour"] = probe(rows, colours, obj_groups)
    out["patch_shape"] = probe(rows, shapes, obj_groups)
    out["patch_shape_3x3"] = probe(rows3, shapes, obj_groups)

    # per object slot (0 and 1: the related pair; 2: the third object of --objects 3): its colour
    # and shape from the whole image's representations, the pooled embedding being the first stage's
    flat = tokens.reshape(n, -1)
    for k in range(max(len(g["objects"]) for g in graphs)):
        pick = [i for i, g in enumerate(graphs) if len(g["objects"]) > k]
        for attr in ("color", "shape"):
            y = np.array([graphs[i]["objects"][k][attr] for i in pick])
            out[f"object{k}_{attr}_pooled"] = probe(pooled[pick], y, groups[pick])
            out[f"object{k}_{attr}_adapter_tokens"] = probe(flat[pick], y, groups[pick])

    # relation: is the alphabetically first colour's object the left (upper) one
    for axis, pair in (("horizontal", ("left of", "right of")), ("vertical", ("above", "below"))):
        pick = [i for i, g in enumerate(graphs) if g["relation"] in pair]
        if len(pick) < 50:
            continue
        y = []
        for i in pick:
            a, b = graphs[i]["objects"][:2]
            first_is_a = a["color"] < b["color"]
            a_first = graphs[i]["relation"] == pair[0]  # object 0 left of / above object 1
            y.append(int(first_is_a == a_first))
        y, pg = np.array(y), groups[pick]
        out[f"relation_{axis}_patch_tokens"] = probe(patch[pick].reshape(len(pick), -1), y, pg)
        out[f"relation_{axis}_adapter_tokens"] = probe(tokens[pick].reshape(len(pick), -1), y, pg)
        out[f"relation_{axis}_pooled"] = probe(pooled[pick], y, pg)

    # adapter tokens on a grid: the colour covering most of each token's cell
    side = math.isqrt(tokens.shape[1])
    if side * side == tokens.shape[1] and data["images"].shape[-1] % side == 0:
        palette = np.array([(22, 22, 26)] + list(COLORS.values()), np.float32)
        names = np.array(["background"] + list(COLORS))
        labels = []
        step = size // side
        for i in range(n):
            img = _raw_image(data["images"][i], pp)
            dist = ((img[:, :, None, :].astype(np.float32) - palette[None, None]) ** 2).sum(-1)
            idx = dist.argmin(-1)
            for r in range(side):
                for c in range(side):
                    cell = idx[r * step:(r + 1) * step, c * step:(c + 1) * step].reshape(-1)
                    objects = np.bincount(cell, minlength=len(palette))[1:]
                    labels.append(names[1 + objects.argmax()] if objects.max() >= 0.1 * cell.size else "background")
        x = tokens.reshape(n * side * side, -1)
        cell_groups = np.repeat(groups, side * side)
        out["adapter_colour_at_cell"] = probe(x, np.array(labels), cell_groups)
    print(json.dumps(out))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _raw_image(image: torch.Tensor, pp: dict):
    """The scene image back in uint8 RGB from the normalised tensor (the transform is a plain resize
    at the scenes' own size, so this is the drawn image up to rounding)."""
    x = image.numpy()
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    mean = np.array(pp.get("mean") or OPENAI_DATASET_MEAN)[:, None, None]  # open_clip's default, as the transform's
    std = np.array(pp.get("std") or OPENAI_DATASET_STD)[:, None, None]
    return np.clip((x * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)


if __name__ == "__main__":
    run()
