"""Beam step: exact cosine top-k of query embeddings over a store's ``embedding`` column.

    (query_id, embedding) -> SearchTopK(store, k) -> (query_id, [(score, image_id), ...] best first)

All query embeddings are collected into one matrix (sorted by query_id) and handed to every
worker as a side input. Each store shard is one work item: it is read in blocks of
``block_rows`` rows, each block scored against blocks of ``query_block`` queries (float32
matrix products), and a running top-k per query is kept, so a worker holds at most one row
block, one ``query_block x block_rows`` score block and the queries' top-k state; never the
whole store. Per-shard top-k lists are then merged per query_id with a combiner.

Order (a total order, so the result does not depend on shards, blocks or workers): higher
score first, then image_id ascending. Scores are float32 dot products of the float32 query
embedding and the stored float16 embedding cast to float32 (both L2-normalised: cosine).
"""
import heapq
from typing import Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas import columns as C
from schemas.reader import StoreError, TokenStore, open_parquet
from schemas.token_store import binary_column_to_numpy
from transforms.progress import Tally

NAMESPACE = "edje_retrieve"
DEFAULT_BLOCK_ROWS = 8192
DEFAULT_QUERY_BLOCK = 1024

Hit = Tuple[float, str]  # (score, image_id)


def order_key(hit: Hit):
    """Best first: higher score, then image_id ascending."""
    return -hit[0], hit[1]


def stack_queries(pairs: Iterable[Tuple[str, np.ndarray]], dim: int):
    """[(query_id, embedding)] -> (query ids sorted, (n, dim) float32 matrix in that order).

    Sorting makes the blocks, and so the float results, independent of arrival order."""
    pairs = sorted(pairs, key=lambda kv: kv[0])
    if not pairs:
        return [], np.zeros((0, dim), np.float32)
    matrix = np.stack([np.asarray(e, np.float32).reshape(-1) for _, e in pairs])
    if matrix.shape[1] != dim:
        raise ValueError(f"query embeddings have {matrix.shape[1]} dims, the store's have {dim}")
    return [q for q, _ in pairs], np.ascontiguousarray(matrix)


class RunningTopK:
    """Top-k (score, image_id) for a block of queries over a stream of row blocks, exact with
    the tie-break. State: ``scores`` (q, j) float32 and ``ids`` (q, j) object, j <= k,
    unordered within a row."""

    def __init__(self, num_queries: int, k: int):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.scores = np.zeros((num_queries, 0), np.float32)
        self.ids = np.empty((num_queries, 0), object)

    def update(self, block_scores: np.ndarray, block_ids: np.ndarray) -> None:
        """Merges a (q, n) score block (columns: ``block_ids``) with the current top-k."""
        block_scores = np.where(np.isnan(block_scores), np.float32(-np.inf), block_scores).astype(np.float32)
        old_ids, j = self.ids, self.ids.shape[1]
        allscores = np.concatenate([self.scores, block_scores], axis=1)
        keep = select_topk(allscores, self.k, lambda r, cols: _ids_at(old_ids[r], block_ids, j, cols))
        self.scores = np.take_along_axis(allscores, keep, axis=1)
        self.ids = _ids_at(old_ids, block_ids, j, keep)

    def results(self, i: int) -> List[Hit]:
        """Query ``i``'s hits, best first."""
        return sorted(((float(s), str(x)) for s, x in zip(self.scores[i], self.ids[i])), key=order_key)


def _ids_at(old_ids, block_ids, j, cols):
    """ids at columns ``cols`` of [old state (j columns) | block], without building that
    (q, j + n) id matrix. ``old_ids`` and ``cols`` are both 2-D (q rows) or both 1-D (one row)."""
    cols = np.asarray(cols)
    from_old = (np.take_along_axis(old_ids, np.minimum(cols, j - 1), axis=-1) if j
                else np.empty(cols.shape, object))
    from_block = block_ids[np.maximum(cols - j, 0)]
    return np.where(cols < j, from_old, from_block)


def select_topk(scores: np.ndarray, k: int, ids_of) -> np.ndarray:
    """Column indices (q, min(k, n)) of each row's k best by (score desc, id asc), unordered.

    ``ids_of(row, cols)`` gives the ids of some columns of a row; it is only called for rows with
    a tie at the k-th score, the only rows where ids change the selected set."""
    q, n = scores.shape
    if n <= k:
        return np.broadcast_to(np.arange(n), (q, n)).copy()
    keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, keep, axis=1).min(axis=1)
    tied = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k)
    for r in tied:
        above = np.flatnonzero(scores[r] > kth[r])
        at = np.flatnonzero(scores[r] == kth[r])
        ids = ids_of(r, at)
        at = at[sorted(range(len(at)), key=lambda i: ids[i])][: k - len(above)]
        keep[r] = np.concatenate([above, at])
    return keep


def shard_topk(blocks: Iterable[Tuple[Sequence[str], np.ndarray]], queries: np.ndarray, k: int,
               query_block: int = DEFAULT_QUERY_BLOCK) -> List[List[Hit]]:
    """Row blocks (ids, (n, d) float32 embeddings) of one shard -> its hits for every query
    (in the order of ``queries``), best first."""
    starts = range(0, len(queries), query_block)
    tops = [RunningTopK(len(queries[s:s + query_block]), k) for s in starts]
    for ids, emb in blocks:
        if not len(ids):
            continue
        ids = np.asarray(list(ids), dtype=object)
        emb_t = np.ascontiguousarray(emb.T)
        for s, top in zip(starts, tops):
            top.update(queries[s:s + query_block] @ emb_t, ids)
    return [top.results(i) for top in tops for i in range(len(top.scores))]


def read_embedding_blocks(store: TokenStore, shard: str, block_rows: int):
    """One shard's (ids, float32 embeddings) in blocks of at most ``block_rows`` rows."""
    f = open_parquet(store.shard_file(shard))
    for batch in f.iter_batches(batch_size=block_rows, columns=[C.IMAGE_ID, C.EMBEDDING]):
        emb = binary_column_to_numpy(batch.column(C.EMBEDDING), "<f2", (store.embedding_dim,))
        yield batch.column(C.IMAGE_ID).to_pylist(), emb.astype(np.float32)


class ScoreShardFn(beam.DoFn):
    """shard name, side input (query ids, matrix) -> (query_id, [hits of this shard])."""

    def __init__(self, store: str, k: int, block_rows: int, query_block: int, tally: Optional[Tally] = None):
        self.store_path, self.k = store, k
        self.block_rows, self.query_block = block_rows, query_block
        self.rows_scored = Metrics.counter(NAMESPACE, "rows_scored")
        self.tally = tally or Tally(None)

    def setup(self):
        self.store = TokenStore(self.store_path)

    def process(self, shard, queries):
        query_ids, matrix = queries
        if not query_ids:
            return
        seen = [0]

        def counted():
            for ids, emb in read_embedding_blocks(self.store, shard, self.block_rows):
                seen[0] += len(ids)
                yield ids, emb
                self.tally.add(len(ids))

        hits = shard_topk(counted(), matrix, self.k, self.query_block)
        expected = self.store.shards[shard]["rows"]
        if seen[0] != expected:
            raise StoreError(f"{self.store.shard_file(shard)}: {seen[0]} rows, the manifest says {expected}; "
                             f"run pipeline.verify on the store")
        self.rows_scored.inc(seen[0])
        yield from zip(query_ids, hits)

    def finish_bundle(self):
        self.tally.flush()


class TopKCombineFn(beam.CombineFn):
    """Lists of hits -> the k best of their union (best first)."""

    def __init__(self, k: int):
        self.k = k

    def create_accumulator(self):
        return []

    def add_input(self, acc, hits):
        return heapq.nsmallest(self.k, list(acc) + list(hits), key=order_key)

    def merge_accumulators(self, accs):
        return heapq.nsmallest(self.k, (h for a in accs for h in a), key=order_key)

    def extract_output(self, acc):
        return sorted(acc, key=order_key)


class SearchTopK(beam.PTransform):
    """(query_id, embedding) -> (query_id, [(score, image_id)] best first, min(k, store rows) long).

    Queries that no shard could answer (an empty store) do not appear in the output."""

    def __init__(self, store: str, k: int, block_rows: int = DEFAULT_BLOCK_ROWS,
                 query_block: int = DEFAULT_QUERY_BLOCK, tally: Optional[Tally] = None):
        super().__init__()
        if k < 1 or block_rows < 1 or query_block < 1:
            raise ValueError("k, block_rows and query_block must be >= 1")
        self.store, self.k, self.block_rows, self.query_block = store, k, block_rows, query_block
        self.tally = tally

    def expand(self, query_embeddings):
        opened = TokenStore(self.store)  # the launcher reads the manifest once: the shard list
        shards = sorted(name for name, s in opened.shards.items() if s["rows"] > 0)
        dim = opened.embedding_dim
        matrix = (query_embeddings
                  | "CollectQueries" >> beam.combiners.ToList()
                  | "StackQueries" >> beam.Map(stack_queries, dim))
        return (query_embeddings.pipeline
                | "ListStoreShards" >> beam.Create(shards)
                | "SpreadStoreShards" >> beam.Reshuffle()
                | "ScoreShards" >> beam.ParDo(ScoreShardFn(self.store, self.k, self.block_rows, self.query_block, self.tally),
                                              beam.pvalue.AsSingleton(matrix))
                | "MergeTopK" >> beam.CombinePerKey(TopKCombineFn(self.k)))
