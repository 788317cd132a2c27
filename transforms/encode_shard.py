"""Beam step: one input shard -> one committed token shard.

The shard is the unit of work and of commit: its samples are decoded in tar order, run through
backbone + adapter in fixed-size batches (so batch composition never depends on bundling or
worker count), quantized, and streamed into ``shards/<name>.parquet`` under a temporary name that
is renamed when complete. Failures go to ``failures/<name>.parquet``; the stats record
(``stats/<name>.json``) is written last and marks the shard committed.
"""
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import torch
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from schemas.quantization import get_scheme
from schemas import columns as C
from schemas import shard_stats, storage
from schemas.token_store import FAILURE_SCHEMA, QUANT_SCHEME, TOKEN_ROW_GROUP_SIZE, shard_metadata, token_schema
from transforms.image_decode import DecodeError, decode_image
from transforms.tar_samples import ShardReadError, iter_samples
from transforms.tensor_decode import DECODERS, TensorJpegDecoder, TensorPreprocess, fast_jpeg_size
from transforms.vision_handler import VisionModelHandler

log = logging.getLogger(__name__)
NAMESPACE = "edje_precompute"
# Settings recorded per shard; a committed shard is reused only if all of them match.
ENCODE_SETTINGS = ("batch_size", "precision", "torch_threads", "device", "max_member_bytes", "max_pixels", "decode",
                   "quantization")
# Value of a setting in stats records written before it existed (those shards used it).
SETTING_DEFAULTS = {"decode": "pil", "quantization": QUANT_SCHEME}


def bad_samples(failures) -> int:
    """Samples that failed, not counting duplicates or shard-level records."""
    return sum(1 for f in failures if f[C.IMAGE_ID] is not None and f[C.STAGE] != C.STAGE_DEDUP)


def over_budget(bad: int, rows: int, max_rate: float, min_samples: int):
    """A reason string if the shard's bad samples exceed the budget, else None (below
    ``min_samples`` samples a rate says too little to fail a job on)."""
    samples = rows + bad
    if samples >= min_samples and bad > max_rate * samples:
        return f"failure budget exceeded: {bad} of {samples} samples failed ({bad / samples:.0%} > {max_rate:.0%})"
    return None


@dataclass(frozen=True)
class EncodeConfig:
    store: str
    checkpoint: Optional[str]
    fingerprint: str
    num_tokens: int
    token_dim: int
    embedding_dim: int
    batch_size: int = 32
    device: str = "cpu"
    precision: str = "fp32"
    torch_threads: int = 1
    max_member_bytes: int = 64 << 20
    max_pixels: int = 89_478_485
    decode: str = "pil"  # "pil", or "torchvision": JPEGs decoded + preprocessed on `device` in batches
    quantization: str = QUANT_SCHEME  # a scheme name of schemas.quantization.SCHEMES
    max_failure_rate: float = 0.5
    failure_budget_min_samples: int = 20


def _caption(data: Optional[bytes]):
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace").strip()
    return text[: C.CAPTION_MAX_CHARS]


def _metadata(data: Optional[bytes]):
    if data is None or len(data) > C.METADATA_MAX_BYTES:
        return None
    try:
        text = data.decode("utf-8")
        json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return text


def drop_digest(drop_ids) -> str:
    return hashlib.sha256("\n".join(sorted(drop_ids)).encode("utf-8")).hexdigest()


class EncodeShardFn(beam.DoFn):
    """ShardSpec (+ side input: ids this shard must not serve) -> stats record dict."""

    def __init__(self, cfg: EncodeConfig):
        self.cfg = cfg
        self._shared = shared.Shared()
        self.images_ok = Metrics.counter(NAMESPACE, "images_ok")
        self.images_failed = Metrics.counter(NAMESPACE, "images_failed")
        self.bytes_written = Metrics.counter(NAMESPACE, "bytes_written")
        self.shards_written = Metrics.counter(NAMESPACE, "shards_written")
        self.shards_skipped = Metrics.counter(NAMESPACE, "shards_skipped")
        self.shards_failed = Metrics.counter(NAMESPACE, "shards_failed")

    def setup(self):
        c = self.cfg
        self._handler = VisionModelHandler(c.checkpoint, c.device, c.precision, c.torch_threads, c.batch_size)
        self._model = self._shared.acquire(self._handler.load_model,
                                           tag=f"{c.fingerprint}/{c.device}/{c.torch_threads}/{c.precision}")
        self._transform = self._model.backbone.image_transform()
        if c.decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, not {c.decode!r}")
        if c.decode == "torchvision":
            self._jpeg_decoder = TensorJpegDecoder(c.device)
            self._tensor_preprocess = TensorPreprocess.for_backbone(self._model.backbone)
        self._scheme = get_scheme(c.quantization)
        self._schema = token_schema(c.num_tokens, c.token_dim, c.embedding_dim, c.quantization).with_metadata(
            shard_metadata(c.fingerprint, c.num_tokens, c.token_dim, c.quantization))

    def _committed(self, spec, digest):
        rec = shard_stats.read(self.cfg.store, spec.name)
        if not rec or rec.get("status") != shard_stats.STATUS_OK:
            return None
        if rec.get("fingerprint") != self.cfg.fingerprint or rec.get("drop_digest") != digest \
                or rec.get("source") != spec.source:
            return None
        # Other encode settings may change the bytes: such a shard is redone, never mixed in.
        if any(rec.get(k, SETTING_DEFAULTS.get(k)) != getattr(self.cfg, k) for k in ENCODE_SETTINGS):
            return None
        for key in ("shard", "failures"):
            entry = rec.get(key)
            if entry is None:
                continue
            path = storage.join(self.cfg.store, entry["path"])
            if not storage.exists(path) or storage.size(path) != entry["bytes"]:
                return None
        return rec

    def process(self, spec, drops):
        drop_ids = set(drops[spec.name])
        digest = drop_digest(drop_ids)
        rec = self._committed(spec, digest)
        if rec is not None:
            self.shards_skipped.inc()
            yield rec
            return
        started = time.time()
        failures = []
        counts = {"rows": 0, "duplicates": 0}

        def fail(image_id, stage, reason):
            failures.append({C.IMAGE_ID: image_id, C.SOURCE: spec.source, C.STAGE: stage, C.REASON: reason})

        shard_error = None
        status = shard_stats.STATUS_OK
        batches = self._encode(spec, drop_ids, fail, counts)
        shard_path = f"{C.SHARDS_DIR}/{spec.name}.parquet"
        budget = {}

        def within_budget():
            budget["reason"] = over_budget(bad_samples(failures), counts["rows"], self.cfg.max_failure_rate,
                                           self.cfg.failure_budget_min_samples)
            return budget["reason"] is None

        try:
            shard_file = storage.write_parquet_atomic(storage.join(self.cfg.store, shard_path), self._schema,
                                                      batches, TOKEN_ROW_GROUP_SIZE, commit_if=within_budget)
        except _ShardUnreadable as e:
            status, shard_error = shard_stats.STATUS_FAILED, str(e)
            fail(None, C.STAGE_READ, shard_error)
        else:
            shard_error = counts.get("shard_error")
            if shard_file is None:
                status, shard_error = shard_stats.STATUS_OVER_BUDGET, budget["reason"]
            elif shard_error:
                fail(None, C.STAGE_READ, shard_error)
        readable = status == shard_stats.STATUS_OK
        failures_file = None
        if failures and status != shard_stats.STATUS_OVER_BUDGET:
            failures_path = f"{C.FAILURES_DIR}/{spec.name}.parquet"
            table = pa.Table.from_pylist(failures, FAILURE_SCHEMA)
            failures_file = storage.write_parquet_atomic(storage.join(self.cfg.store, failures_path), FAILURE_SCHEMA,
                                                  table.to_batches(), 65536)
            failures_file.update(path=failures_path, rows=len(failures))
        rec = {
            "name": spec.name, "source": spec.source, "ordinal": spec.ordinal,
            "fingerprint": self.cfg.fingerprint, "drop_digest": digest,
            "status": status,
            "rows": counts["rows"], "failed": failures_file["rows"] if failures_file else 0,
            "duplicates": counts["duplicates"], "bad_samples": bad_samples(failures),
            "shard": dict(shard_file, path=shard_path) if readable else None,
            "failures": failures_file, "reason": shard_error,
            **{k: getattr(self.cfg, k) for k in ENCODE_SETTINGS},
            "seconds": round(time.time() - started, 3),
        }
        shard_stats.write(self.cfg.store, rec)
        self.images_ok.inc(counts["rows"])
        self.images_failed.inc(rec["failed"])
        self.bytes_written.inc((shard_file["bytes"] if readable else 0) + (failures_file or {}).get("bytes", 0))
        (self.shards_written if readable else self.shards_failed).inc()
        if status == shard_stats.STATUS_OVER_BUDGET:
            log.error("%s: %s; nothing committed for it", spec.source, shard_error)
        yield rec

    def _encode(self, spec, drop_ids, fail, counts):
        """Generator of Arrow record batches for the shard; records failures through ``fail``.

        Batches for the forward pass are the next ``batch_size`` decodable samples in tar order,
        whatever the decoder. With ``decode="torchvision"`` samples are first staged (raw bytes)
        until enough are held to complete a batch, then decoded together; failures recorded
        while samples are staged wait in the stage so that records keep tar order.
        """
        seen, pending, rows, staged = set(), [], [], []
        batch_size = self.cfg.batch_size
        tensor_decode = self.cfg.decode == "torchvision"

        def flush():
            if not pending:
                return
            batch = pending[:batch_size]
            del pending[:batch_size]
            outputs = self._handler.run_inference([p[1] for p in batch], self._model)
            for (key, _, caption, meta), out in zip(batch, outputs):
                try:
                    q, scales = self._scheme.encode(out.tokens[None])
                    if not np.isfinite(out.embedding).all():
                        raise ValueError("non-finite values in embedding")
                except ValueError as e:
                    fail(key, C.STAGE_ENCODE, f"model output rejected: {e}")
                    continue
                rows.append((key, q.tobytes(), scales.tobytes(),
                             out.embedding.astype("<f2").tobytes(), caption, meta))

        def drain(final=False):
            while len(rows) >= TOKEN_ROW_GROUP_SIZE or (final and rows):
                chunk = rows[:TOKEN_ROW_GROUP_SIZE]
                del rows[:TOKEN_ROW_GROUP_SIZE]
                counts["rows"] += len(chunk)
                yield pa.RecordBatch.from_arrays(
                    [pa.array(col, type=f.type) for col, f in zip(zip(*chunk), self._schema)], schema=self._schema)

        def stage_fail(*args):  # a failure behind staged samples is recorded after them
            if staged:
                staged.append(("fail", args))
            else:
                fail(*args)

        staged_images = [0]

        def stage(key, data, caption, meta):
            staged.append(("image", (key, data, caption, meta)))
            staged_images[0] += 1

        def decode_staged():
            self._decode_staged(staged, pending, fail)
            staged.clear()
            staged_images[0] = 0

        sample_count = 0
        try:
            f = storage.open_read(spec.source)
        except Exception as e:
            raise _ShardUnreadable(f"cannot open: {type(e).__name__}: {e}") from e
        with f:
            try:
                for sample in iter_samples(f, read_data=True, max_member_bytes=self.cfg.max_member_bytes):
                    sample_count += 1
                    if tensor_decode:
                        self._one_sample(sample, drop_ids, seen, stage_fail, counts, stage=stage)
                        if len(pending) + staged_images[0] >= batch_size:
                            decode_staged()
                    else:
                        self._one_sample(sample, drop_ids, seen, fail, counts, pending=pending)
                    while len(pending) >= batch_size:
                        flush()
                        yield from drain()
            except ShardReadError as e:
                if sample_count == 0:
                    raise _ShardUnreadable(str(e)) from e
                counts["shard_error"] = str(e)
        decode_staged()
        while pending:
            flush()
        yield from drain(final=True)

    def _one_sample(self, sample, drop_ids, seen, fail, counts, pending=None, stage=None):
        """Dedup and pick the image member; then decode it now into ``pending`` (PIL), or hand
        its bytes to ``stage`` (tensor decode later)."""
        key = sample.key
        if key in drop_ids or key in seen:
            counts["duplicates"] += 1
            fail(key, C.STAGE_DEDUP, C.REASON_DUPLICATE)
            return
        seen.add(key)
        ext = sample.image_extension()
        if ext is None:
            oversize = [r for s, r in sample.problems if "cap" in r]
            reason = oversize[0] if oversize else \
                f"no image member (has: {', '.join(sorted(sample.members)) or 'nothing'})"
            fail(key, C.STAGE_READ, reason)
            return
        caption, meta = _caption(sample.members.get("txt")), _metadata(sample.members.get("json"))
        if stage is not None:
            stage(key, sample.members[ext], caption, meta)
            return
        tensor = self._pil_tensor(key, sample.members[ext], fail)
        if tensor is not None:
            pending.append((key, tensor, caption, meta))

    def _pil_tensor(self, key, data, fail):
        """PIL decode + open_clip transform -> (3, h, w) float tensor, or None (failure recorded)."""
        try:
            image = decode_image(data, self.cfg.max_pixels)
            return self._transform(image)
        except DecodeError as e:
            fail(key, C.STAGE_DECODE, str(e))
        except Exception as e:  # a transform failing on a valid image is still this sample's failure
            fail(key, C.STAGE_DECODE, f"preprocessing failed ({type(e).__name__}: {e})")
        return None

    def _decode_staged(self, staged, pending, fail):
        """Decodes the staged samples, in tar order, into ``pending``: plain JPEGs together with
        the tensor decoder on the job's device; the rest, and any it refuses, one by one with PIL
        (same failure records as ``decode="pil"``)."""
        if not staged:
            return
        fast = {}
        for n, (kind, item) in enumerate(staged):
            if kind == "image":
                size = fast_jpeg_size(item[1])
                if size is not None and size[0] * size[1] <= self.cfg.max_pixels:
                    fast[n] = item[1]
        tensors = {}
        if fast:
            crops, same_size = {}, {}
            for n, image in zip(fast, self._jpeg_decoder.decode(list(fast.values()))):
                if image is not None:
                    same_size.setdefault(tuple(image.shape), []).append((n, image))
            for group in same_size.values():  # one resize per image size (img2dataset output shares sizes)
                try:
                    images = group[0][1][None] if len(group) == 1 else torch.stack([im for _, im in group])
                    crops.update(zip((n for n, _ in group), self._tensor_preprocess.resize_crop(images)))
                except Exception as e:  # noqa: BLE001 - PIL then decides about these samples
                    log.warning("tensor preprocessing refused %s (%s: %s); using PIL",
                                ", ".join(staged[n][1][0] for n, _ in group), type(e).__name__, e)
            if crops:
                batch = self._tensor_preprocess.normalize(torch.stack(list(crops.values())))
                tensors = dict(zip(crops, batch.unbind(0)))
        device = self._jpeg_decoder.device
        for n, (kind, item) in enumerate(staged):
            if kind == "fail":
                fail(*item)
                continue
            key, data, caption, meta = item
            tensor = tensors.get(n)
            if tensor is None:
                tensor = self._pil_tensor(key, data, fail)
                if tensor is None:
                    continue
                tensor = tensor.to(device)
            pending.append((key, tensor, caption, meta))


class _ShardUnreadable(Exception):
    pass
