"""Beam step: routed requests -> (request, joint-encoder logit), scored where the tokens live.

Requests are grouped by shard; each group reads only the rows it needs (only their row groups),
in chunks, and scores its pairs right there in full batches: tokens are never shuffled. This is
one DoFn rather than RunInference: RunInference's BatchElements starts at batch size 1 and adds
several steps per job, which cost more than the whole job's reads on a small job, and a shard
group already holds everything a full batch needs.
"""
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from schemas.reader import TokenStore
from transforms.joint_handler import JointScorerHandler
from transforms.progress import Tally

ROWS_PER_READ = 2048


def batch_order(request, n_tokens: int):
    """Pairs are scored in this order: same token length together, then same text (score_batch
    runs a batch in groups of one text length, so a batch of few lengths runs as few large
    GEMMs). A pair's score does not depend on its batch, so this changes speed only; the key is
    total, so batches are deterministic."""
    return n_tokens, request.text, request.query_id, request.image_id


class _ScoreShard(beam.DoFn):
    """(shard, [(row, request), ...]) -> (request, logit) for every request."""

    def __init__(self, store_path: str, handler: JointScorerHandler, tally: Optional[Tally] = None):
        self.store_path, self.handler = store_path, handler
        self.tally = tally or Tally(None)
        self._model_handle = shared.Shared()  # one model per worker process, as RunInference does
        self.rows_read = Metrics.counter("edje_rerank", "token_rows_read")
        self.pairs_scored = Metrics.counter("edje_rerank", "pairs_scored")
        self.batches = Metrics.counter("edje_rerank", "joint_batches")

    def setup(self):
        self.store = TokenStore(self.store_path)
        self.model = self._model_handle.acquire(self.handler.load_model)

    def process(self, element):
        shard, routed = element
        by_row = {}
        for row, request in routed:
            by_row.setdefault(row, []).append(request)
        rows = sorted(by_row)
        size = self.handler.batch_size
        for start in range(0, len(rows), ROWS_PER_READ):
            chunk = rows[start:start + ROWS_PER_READ]
            _, tokens, _ = self.store.read_rows(shard, chunk)
            self.rows_read.inc(len(chunk))
            pairs = [(request, i) for i, row in enumerate(chunk) for request in by_row[row]]
            n_tokens = self._token_lengths({r.text for r, _ in pairs})
            pairs.sort(key=lambda p: batch_order(p[0], n_tokens[p[0].text]))
            for b in range(0, len(pairs), size):
                batch = pairs[b:b + size]
                logits = self.handler.run_inference([(r.text, tokens[i]) for r, i in batch], self.model)
                self.batches.inc()
                self.pairs_scored.inc(len(batch))
                self.tally.add(len(batch))
                for (request, _), logit in zip(batch, logits):
                    yield request, float(logit)

    def _token_lengths(self, texts):
        texts = sorted(texts)
        _, mask = self.model.tokenizer(texts)
        return dict(zip(texts, mask.sum(1).tolist()))

    def finish_bundle(self):
        self.tally.flush()


class ScorePairs(beam.PTransform):
    def __init__(self, store_path: str, handler: JointScorerHandler, tally: Optional[Tally] = None):
        super().__init__()
        self.store_path, self.handler, self.tally = store_path, handler, tally

    def expand(self, routed):
        return (routed
                | "GroupByShard" >> beam.GroupByKey()
                | "ReadAndScore" >> beam.ParDo(_ScoreShard(self.store_path, self.handler, self.tally)))
