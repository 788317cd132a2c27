"""Reading a token store: manifest-validated, id lookups through the index, row-level reads."""
from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute.is_in)
import pyarrow.parquet as pq

from schemas import columns as C
from schemas import index as idx
from schemas import manifest as mf
from schemas import storage
from schemas.quantization import UnknownSchemeError, get_scheme
from schemas.token_store import binary_column_to_numpy


class StoreError(ValueError):
    pass


def open_parquet(path: str) -> pq.ParquetFile:
    if "://" in path:
        return pq.ParquetFile(pa.PythonFile(storage.open_read(path), mode="r"), page_checksum_verification=True)
    return pq.ParquetFile(path, page_checksum_verification=True)


class TokenStore:
    """A store opened through its manifest (a store whose manifest does not validate is refused).

    ``filesystem_options``: Beam's object-store options for this process (see
    ``storage.set_filesystem_options``), e.g. ``{"s3_endpoint_url": ..., "s3_access_key_id": ...}``;
    None keeps those already set.
    """

    def __init__(self, path: str, filesystem_options=None):
        storage.set_filesystem_options(filesystem_options)
        self.path = str(path).rstrip("/")
        try:
            self.manifest = mf.read(self.path)
        except mf.ManifestError as e:
            raise StoreError(f"refusing store {self.path}: {e}") from None
        model = self.manifest["model"]
        self.fingerprint = model["fingerprint"]
        self.num_tokens, self.token_dim = model["num_tokens"], model["token_dim"]
        self.embedding_dim = model["embedding_dim"]
        try:  # tokens are decoded by the scheme the store declares
            self.scheme = get_scheme(self.manifest["quantization"]["scheme"])
        except UnknownSchemeError as e:
            raise StoreError(f"refusing store {self.path}: {e}") from None
        self.shards = {s["name"]: s for s in self.manifest["shards"]}
        self.buckets = self.manifest["index"]["buckets"]

    def __len__(self):
        return self.manifest["totals"]["rows"]

    def require_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise StoreError(f"store {self.path} holds tokens of checkpoint {self.fingerprint[:12]}, "
                             f"but the checkpoint given is {fingerprint[:12]}: tokens and joint encoder "
                             f"must come from the same checkpoint")

    def shard_file(self, name: str) -> str:
        return storage.join(self.path, self.shards[name]["path"])

    def bucket_of(self, image_id: str) -> int:
        return idx.bucket_of(image_id, self.buckets)

    def lookup_bucket(self, bucket: int, image_ids: Iterable[str]) -> Dict[str, Tuple[str, int]]:
        """ids that all hash to ``bucket`` -> {id: (shard, row)} for those in the store."""
        wanted = set(image_ids)
        if not wanted:
            return {}
        path = storage.join(self.path, self.manifest["index"]["files"][bucket]["path"])
        table = open_parquet(path).read()
        mask = pa.compute.is_in(table.column(C.IMAGE_ID), value_set=pa.array(sorted(wanted), pa.string()))
        hits = table.filter(mask)
        return {i: (s, r) for i, s, r in zip(*(hits.column(c).to_pylist() for c in (C.IMAGE_ID, C.SHARD, C.ROW)))}

    def lookup(self, image_ids: Iterable[str]) -> Dict[str, Tuple[str, int]]:
        by_bucket = defaultdict(set)
        for i in image_ids:
            by_bucket[self.bucket_of(i)].add(i)
        found = {}
        for bucket, ids in sorted(by_bucket.items()):
            found.update(self.lookup_bucket(bucket, ids))
        return found

    def read_rows(self, shard: str, rows: List[int]):
        """Reads only the row groups holding ``rows`` -> (ids, tokens float32 (n, m, h), embeddings float32 (n, d)),
        in the order of ``rows``."""
        f = open_parquet(self.shard_file(shard))
        meta = f.metadata
        starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
            raise StoreError(f"{shard}: row out of range")
        groups = sorted(set(np.searchsorted(starts, rows, side="right") - 1))
        table = f.read_row_groups(groups, columns=[C.IMAGE_ID, C.TOKENS, C.TOKEN_SCALES, C.EMBEDDING])
        offsets, acc = {}, 0  # where each read group starts in the concatenated table
        for g in groups:
            offsets[g] = acc
            acc += meta.row_group(g).num_rows
        local = [offsets[g] + int(r - starts[g]) for r, g in zip(rows, np.searchsorted(starts, rows, side="right") - 1)]
        table = table.take(pa.array(local, pa.int64()))
        m, h, q = self.num_tokens, self.token_dim, self.scheme
        for col, width in ((C.TOKENS, q.token_bytes(m, h)), (C.TOKEN_SCALES, q.scale_bytes(m, h))):
            if table.schema.field(col).type.byte_width != width:
                raise StoreError(f"{shard}: column {col} is not {q.name} at {m} x {h}")
        tok = binary_column_to_numpy(table.column(C.TOKENS), np.uint8, (q.token_bytes(m, h),))
        sc = binary_column_to_numpy(table.column(C.TOKEN_SCALES), np.uint8, (q.scale_bytes(m, h),))
        e = binary_column_to_numpy(table.column(C.EMBEDDING), "<f2", (self.embedding_dim,))
        tokens = q.decode(tok, sc, m, h)
        return table.column(C.IMAGE_ID).to_pylist(), tokens, e.astype(np.float32)

    def get(self, image_ids: List[str]):
        """ids -> (found ids, tokens, embeddings) in the given order, and the ids not in the store."""
        where = self.lookup(image_ids)
        missing = [i for i in image_ids if i not in where]
        by_shard = defaultdict(list)
        for i in image_ids:
            if i in where:
                by_shard[where[i][0]].append(where[i][1])
        got = {}
        for shard, rows in by_shard.items():
            ids, tok, emb = self.read_rows(shard, sorted(set(rows)))
            got.update({i: (t, e) for i, t, e in zip(ids, tok, emb)})
        found = [i for i in image_ids if i in got]
        if not found:
            return [], np.zeros((0, self.num_tokens, self.token_dim), np.float32), \
                np.zeros((0, self.embedding_dim), np.float32), missing
        return found, np.stack([got[i][0] for i in found]), np.stack([got[i][1] for i in found]), missing


def token_column_bytes_per_element(store, manifest):
    """Stored bytes of the tokens + token_scales columns / (rows x num_tokens x token_dim),
    from the Parquet footers (compressed column-chunk sizes)."""
    stored = rows = 0
    for s in manifest["shards"]:
        with storage.open_read(storage.join(store, s["path"])) as f:
            meta = pq.ParquetFile(pa.PythonFile(f, mode="r")).metadata
        rows += meta.num_rows
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            stored += sum(group.column(c).total_compressed_size for c in range(group.num_columns)
                          if group.column(c).path_in_schema in (C.TOKENS, C.TOKEN_SCALES))
    elements = rows * manifest["model"]["num_tokens"] * manifest["model"]["token_dim"]
    return round(stored / elements, 4) if elements else None
