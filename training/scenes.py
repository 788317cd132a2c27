"""The scenes benchmark in memory: every sample decoded once, with its scene group, for group batches."""
import hashlib
import io
import json
import posixpath

import numpy as np
import torch
import torch.nn.functional as F

from schemas import storage
from transforms.image_decode import decode_image
from transforms.shard_files import PatternError, plan_shards
from transforms.tar_samples import iter_samples


def training_shards(pattern: str):
    """The shards a --data pattern names (braces, globs, commas; local or object-store), sorted; a
    named shard that does not exist is an error."""
    try:
        plan = plan_shards(pattern)
    except PatternError as e:
        raise SystemExit(f"error: {e}") from None
    if plan.missing:
        raise SystemExit(f"error: {len(plan.missing)} shard(s) of {pattern} do not exist, e.g. {plan.missing[0]}")
    return sorted({spec.source for spec in plan.shards})


def load_scenes(pattern: str, transform, limit: int = 0):
    """Scene shards -> dict(keys, captions, groups, images (N, 3, H, W) float32, relevant).

    A pattern may name several splits' directories (a mix of 2- and 3-object scenes, say): each
    directory's groups, keys and queries.jsonl stay its own. With more than one directory, group ids
    of later directories are shifted past the earlier ones' and keys are prefixed ``DIR/``, so that
    no two scenes share a group (batches, validation) or a key (relevant sets)."""
    paths = training_shards(pattern)
    directories = sorted({posixpath.dirname(p) for p in paths})
    keys, captions, groups, images, variants, relevant = [], [], [], [], [], []
    offset = 0
    for directory in directories:
        start = len(keys)
        local_keys, local_groups = [], []
        for path in (p for p in paths if posixpath.dirname(p) == directory):
            with storage.open_read(path) as f:
                for s in iter_samples(f):
                    ext = s.image_extension()
                    if ext is None or "txt" not in s.members:
                        continue
                    meta = json.loads(s.members["json"]) if "json" in s.members else {}
                    variants.append(int(meta.get("variant", -1)))
                    local_keys.append(s.key)
                    captions.append(s.members["txt"].decode("utf-8").strip())
                    local_groups.append(int(meta.get("group", len(local_groups))))
                    images.append(transform(decode_image(s.members[ext])))
                    if limit and start + len(local_keys) >= limit:
                        break
            if limit and start + len(local_keys) >= limit:
                break
        keys += [f"{directory}/{k}" for k in local_keys] if len(directories) > 1 else local_keys
        groups += [g + offset for g in local_groups]
        offset += max(local_groups, default=-1) + 1
        relevant += _relevant_sets(directory, local_keys, start)
        if limit and len(keys) >= limit:
            break
    if not keys:
        raise SystemExit(f"error: no training samples in {pattern}")
    return {"keys": keys, "captions": captions, "groups": np.array(groups), "images": torch.stack(images),
            "relevant": relevant, "caption_ids": torch.as_tensor(np.unique(captions, return_inverse=True)[1]),
            "variants": np.array(variants)}


def _relevant_sets(directory: str, keys, start: int):
    """Each sample's relevant sample indices (offset by ``start``) from the directory's queries.jsonl
    (a scene drawn twice answers both captions); without one, each sample answers its own caption."""
    position = {k: start + i for i, k in enumerate(keys)}
    relevant = [[start + i] for i in range(len(keys))]
    queries = storage.join(directory, "queries.jsonl")
    if storage.exists(queries):
        with storage.open_read(queries) as f:
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                q = json.loads(line)
                if q["query_id"] in position:
                    relevant[position[q["query_id"]] - start] = [position[r] for r in q.get("relevant", [])
                                                                 if r in position]
    return relevant


def split_validation(groups: np.ndarray, fraction: float):
    """Whole groups go to validation by a stable hash of the group id."""
    val_groups = {g for g in set(groups.tolist())
                  if int(hashlib.sha256(str(g).encode()).hexdigest(), 16) % 1000 < fraction * 1000}
    val = np.array([g in val_groups for g in groups])
    return np.flatnonzero(~val), np.flatnonzero(val)


def group_members(indices: np.ndarray, groups: np.ndarray):
    """The indices of each group present, as lists in order of group id."""
    by_group = {}
    for i in indices:
        by_group.setdefault(groups[i], []).append(i)
    return [by_group[g] for g in sorted(by_group)]


def group_batches(indices: np.ndarray, groups: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Endless batches of whole groups (a scene and its hard variants train together)."""
    members = group_members(indices, groups)
    order = np.arange(len(members))
    batch_size = min(batch_size, len(indices))  # a split smaller than one batch would never fill it
    while True:
        rng.shuffle(order)
        batch = []
        for g in order:
            batch.extend(members[g])
            if len(batch) >= batch_size:
                yield np.array(batch[:batch_size])
                batch = []


def neighbour_batches(indices: np.ndarray, groups: np.ndarray, embeddings: torch.Tensor, batch_size: int,
                      rng: np.random.Generator, share: float = 1.0, neighbours: int = 32):
    """Endless batches of whole groups, ``share`` of each batch close together under the frozen
    backbone: a batch starts at a random group not yet used this epoch and adds that group's
    nearest unused groups (by the cosine of their mean image embeddings), then random unused ones.
    A reranker's candidates are the first stage's nearest images, so its in-batch negatives should
    include near ones, not only a scene's own variants."""
    members = group_members(indices, groups)
    centre = F.normalize(torch.stack([embeddings[m].float().mean(0) for m in members]), dim=-1)
    k = min(neighbours, len(members) - 1)
    # each group's k nearest others (the first hit is the group itself), in blocks of rows
    near = torch.cat([(block @ centre.t()).topk(k + 1, dim=1).indices[:, 1:]
                      for block in centre.split(1024)]).cpu().numpy()
    batch_size = min(batch_size, len(indices))
    while True:
        used = np.zeros(len(members), dtype=bool)
        order = rng.permutation(len(members))
        fill = iter(order)
        for seed in order:
            if used[seed]:
                continue
            batch, used[seed] = list(members[seed]), True
            for g in near[seed]:
                if len(batch) >= share * batch_size:
                    break
                if not used[g]:
                    batch.extend(members[g])
                    used[g] = True
            # the rest: unused groups in this epoch's random order
            while len(batch) < batch_size and (g := next(fill, None)) is not None:
                if not used[g]:
                    batch.extend(members[g])
                    used[g] = True
            if len(batch) >= batch_size:
                yield np.array(batch[:batch_size])


def same(values: torch.Tensor, idx) -> torch.Tensor:
    """(B, B) True where two batch items share a value (a caption id, a scene group)."""
    v = values[torch.as_tensor(idx, device=values.device)]
    return v[:, None] == v[None, :]
