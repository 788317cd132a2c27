"""Beam step: stats records -> id index bucket files (image_id -> shard, row)."""
import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import columns as C
from schemas import index as idx
from schemas import storage
from schemas.token_store import INDEX_SCHEMA


def index_entries(record, store: str, buckets: int):
    """A committed shard's ids -> (bucket, (image_id, shard name, row)). Reads only the id column."""
    if record.get("shard") is None:
        return
    with storage.open_read(storage.join(store, record["shard"]["path"])) as f:
        ids = pq.read_table(pa.PythonFile(f, mode="r"), columns=[C.IMAGE_ID]).column(0).to_pylist()
    for row, image_id in enumerate(ids):
        yield idx.bucket_of(image_id, buckets), (image_id, record["name"], row)


def write_bucket(store: str, buckets: int, bucket: int, entries) -> dict:
    entries = sorted(entries)
    table = pa.table({C.IMAGE_ID: [e[0] for e in entries], C.SHARD: [e[1] for e in entries],
                      C.ROW: [e[2] for e in entries]}, schema=INDEX_SCHEMA)
    rel = idx.bucket_path(bucket, buckets)
    info = storage.write_parquet_atomic(storage.join(store, rel), INDEX_SCHEMA, table.to_batches(), 65536)
    return dict(info, path=rel, rows=len(entries), bucket=bucket)


class WriteIndex(beam.PTransform):
    """Stats records -> one dict per non-empty bucket file written ({path, rows, bytes, sha256, bucket})."""

    def __init__(self, store: str, buckets: int):
        super().__init__()
        self.store, self.buckets = store, buckets

    def expand(self, records):
        store, buckets = self.store, self.buckets
        return (records
                | "IdsByBucket" >> beam.FlatMap(index_entries, store, buckets)
                | "GroupByBucket" >> beam.GroupByKey()
                | "WriteBuckets" >> beam.MapTuple(lambda b, entries: write_bucket(store, buckets, b, entries)))
