"""Image-caption WebDataset shards (as img2dataset writes them) streamed for training: shard order
and a sample buffer shuffled, decoding, transforms and caption tokenizing in DataLoader workers.

Memory holds the buffer and the batches in flight, never the corpus. Bad input is counted and
skipped, never fatal: a sample without an image or a caption, an image that does not decode, a
damaged shard (the samples read before the damage are kept) and a shard that has vanished since
the run started (``missing_shards``; it is skipped with a warning naming it, so one lost file
does not end a long run). Only a pass over the shards that yields no usable sample at all is an
error. The counts travel with every batch and land in the run's history (``data``: samples used, and each kind skipped).
"""
import collections
import hashlib
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas import storage
from training.batches import featurize
from training.distributed import World, total
from transforms.image_decode import DecodeError, decode_image
from transforms.tar_samples import ShardReadError, iter_samples

log = logging.getLogger("train")

COUNTERS = ("samples", "no_image", "no_caption", "bad_image", "damaged_shards", "missing_shards")


def stable_key(data: bytes) -> int:
    """A signed 64-bit hash of bytes, equal for equal content in every process."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def read_shard(path: str, counts):
    """One shard's samples in tar order; a vanished or damaged shard is counted and logged."""
    try:
        f = storage.open_read(path)
    except (FileNotFoundError, OSError) as e:
        counts["missing_shards"] += 1
        log.warning("training shard %s cannot be opened (%s): skipped", path, e)
        return
    try:
        with f:
            yield from iter_samples(f)
    except ShardReadError as e:
        counts["damaged_shards"] += 1
        log.warning("training shard %s is damaged (%s): its samples before the damage were used", path, e)


def decode_sample(sample, transform, counts):
    """-> (image tensor, caption, image key), or None (counted) for a sample that cannot train."""
    ext = sample.image_extension()
    if ext is None or sample.members.get(ext) is None:
        counts["no_image"] += 1
        return None
    text = sample.members.get("txt")
    caption = text.decode("utf-8", errors="replace").strip() if text else ""
    if not caption:
        counts["no_caption"] += 1
        return None
    data = sample.members[ext]
    try:
        image = transform(decode_image(data))
    except (DecodeError, OSError, ValueError) as e:
        counts["bad_image"] += 1
        log.debug("sample %s: %s", sample.key, e)
        return None
    counts["samples"] += 1
    return image, caption, stable_key(data)


class ShardStream(IterableDataset):
    """Endless local batches of (image, caption) for one rank. Each epoch shuffles the shard order
    (the same on every rank and worker) and deals shards out to the run's consumers (ranks x
    workers); with fewer shards than consumers, every consumer reads every shard and keeps every
    consumers-th sample. ``start``: the step a resumed run starts at, which seeds a fresh order."""

    def __init__(self, shards, transform, captions, clip_tokenizer, batch_size: int, seed: int, world: World,
                 buffer: int = 1000, start: int = 0):
        if not shards:
            raise ValueError("no training shards")
        self.shards, self.transform, self.captions, self.clip_tokenizer = list(shards), transform, captions, clip_tokenizer
        self.batch_size, self.seed, self.world, self.buffer, self.start = batch_size, seed, world, max(1, buffer), start

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        consumer, consumers = self.world.rank * workers + worker, self.world.size * workers
        rng = np.random.default_rng([self.seed, self.start, consumer])
        counts = collections.Counter({k: 0 for k in COUNTERS})
        pending, epoch = [], 0
        while True:
            good_before = counts["samples"]
            for sample in self._shuffled(self._epoch_samples(epoch, consumer, consumers, counts), rng):
                item = decode_sample(sample, self.transform, counts)
                if item is None:
                    continue
                pending.append(item)
                if len(pending) == self.batch_size:
                    yield self._collate(pending, counts, worker)
                    pending = []
            if counts["samples"] == good_before:
                raise RuntimeError(f"a pass over the training shards gave no usable sample (this reader's "
                                   f"share of {len(self.shards)} shards, e.g. {self.shards[0]}); counts: {dict(counts)}")
            epoch += 1

    def _epoch_samples(self, epoch, consumer, consumers, counts):
        order = np.random.default_rng([self.seed, self.start, 1 << 20, epoch]).permutation(len(self.shards))
        per_shard = len(self.shards) >= consumers
        position = 0
        for i in (order[consumer::consumers] if per_shard else order):
            for sample in read_shard(self.shards[i], counts):
                position += 1
                if per_shard or position % consumers == consumer:
                    yield sample

    def _shuffled(self, samples, rng):
        buffer = []
        for s in samples:
            if len(buffer) < self.buffer:
                buffer.append(s)
                continue
            k = int(rng.integers(len(buffer)))
            buffer[k], s = s, buffer[k]
            yield s
        rng.shuffle(buffer)
        yield from buffer

    def _collate(self, items, counts, worker):
        images, captions, image_keys = zip(*items)
        ids, mask, words = self.captions(list(captions))
        return {"images": torch.stack(images), "clip_ids": self.clip_tokenizer(list(captions)),
                "ids": ids, "mask": mask, "words": words,
                "caption_key": torch.tensor([stable_key(c.encode("utf-8")) for c in captions]),
                "image_key": torch.tensor(image_keys), "counts": dict(counts), "worker": worker}


class StreamBatches:
    """This rank's batches from a ``ShardStream``, featurized by the frozen backbone as they come."""

    def __init__(self, stream: ShardStream, backbone, device: str, autocast, workers: int):
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers else None, pin_memory=device.startswith("cuda"))
        self.it = iter(self.loader)
        self.backbone, self.device, self.autocast, self.world = backbone, device, autocast, stream.world
        self.by_worker = {}

    def next(self):
        raw = next(self.it)
        self.by_worker[raw["worker"]] = raw["counts"]
        return featurize(self.backbone, raw, self.device, self.autocast)

    def counters(self) -> dict:
        """What every rank's readers have used and skipped so far (a collective: call on all ranks)."""
        sums = collections.Counter()
        for c in self.by_worker.values():
            sums.update(c)
        return {k: int(total(sums.get(k, 0), self.world)) for k in COUNTERS}
