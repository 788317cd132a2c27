"""The batch the EDJE objective reads, from the in-memory scenes or from streamed shards."""
import dataclasses
from typing import Optional

import numpy as np
import torch

from training.distributed import World


@dataclasses.dataclass
class EdjeBatch:
    """One rank's share of a global batch: the frozen backbone's view of each image and caption,
    the joint encoder's caption tokens, and what says two items are the same (never negatives)."""
    patch: torch.Tensor  # (b, n, d) patch tokens
    img_emb: torch.Tensor  # (b, e) first-stage image embeddings (L2-normalised)
    txt_emb: torch.Tensor  # (b, e) first-stage caption embeddings
    ids: torch.Tensor  # (b, T) joint-encoder token ids
    mask: torch.Tensor  # (b, T) attention mask
    words: torch.Tensor  # (b, T) maskable word number or word class per token, -1: never masked
    caption_key: torch.Tensor  # (b,) int64, equal for identical captions
    image_key: torch.Tensor  # (b,) int64, equal for the same image
    group: Optional[torch.Tensor] = None  # (b,) int64 scene group (a scene's minimal variants), if known


class MemoryBatches:
    """Global batches of indices into tensors held in memory (the scenes): each rank takes its slice."""

    def __init__(self, patch, img_emb, txt_emb, ids, mask, words, caption_ids, groups, world: World):
        self.patch, self.img_emb, self.txt_emb = patch, img_emb, txt_emb
        self.ids, self.mask, self.words, self.caption_ids = ids, mask, words, caption_ids
        self.groups = torch.as_tensor(groups, device=patch.device)
        self.image_ids = torch.arange(len(patch), device=patch.device)
        self.world = world

    def batch(self, idx: np.ndarray) -> EdjeBatch:
        if len(idx) % self.world.size:
            raise ValueError(f"a batch of {len(idx)} does not split over {self.world.size} processes")
        share = len(idx) // self.world.size
        idx = torch.as_tensor(idx[self.world.rank * share:(self.world.rank + 1) * share], device=self.patch.device)
        return EdjeBatch(self.patch[idx], self.img_emb[idx], self.txt_emb[idx], self.ids[idx], self.mask[idx],
                         self.words[idx], self.caption_ids[idx], self.image_ids[idx], self.groups[idx])


@torch.no_grad()
def featurize(backbone, raw: dict, device: str, autocast) -> EdjeBatch:
    """A streamed batch (``stream.ShardStream``) -> EdjeBatch: the frozen backbone runs here, online."""
    images = raw["images"].to(device, non_blocking=True)
    with autocast(device):
        img_emb, patch = backbone(images)
        txt_emb = backbone.encode_text(raw["clip_ids"].to(device, non_blocking=True))
    return EdjeBatch(patch.float(), img_emb.float(), txt_emb.float(), *(raw[k].to(device) for k in
                     ("ids", "mask", "words", "caption_key", "image_key")))
