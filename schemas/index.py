"""The id index: ``index/ids-BBBBB-of-PPPPP.parquet``, image_id -> (shard, row).

Ids are spread over P bucket files by a stable hash (blake2b, 8 bytes, little-endian, mod P) and
sorted within each file, so a reader routes an id to one small file without listing the store.
"""
import hashlib

from schemas import columns as C

SCHEME = "blake2b64-mod"
TARGET_SHARDS_PER_BUCKET = 64


def bucket_of(image_id: str, buckets: int) -> int:
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def default_buckets(num_shards: int) -> int:
    """A power of two near num_shards / 64 (about 0.6M ids per file at 10k images a shard)."""
    need = max(1, -(-num_shards // TARGET_SHARDS_PER_BUCKET))
    return 1 << (need - 1).bit_length()


def bucket_path(bucket: int, buckets: int) -> str:
    return f"{C.INDEX_DIR}/ids-{bucket:05d}-of-{buckets:05d}.parquet"
