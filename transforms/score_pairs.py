"""Beam step: routed requests -> (request, joint-encoder logit), scored where the tokens live.

Requests are grouped by shard; each group reads only the rows it needs (only their row groups),
in chunks, and its pairs go straight into RunInference: tokens are never shuffled.
"""
import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from schemas.reader import TokenStore
from transforms.joint_handler import JointScorerHandler

ROWS_PER_READ = 2048


class _ReadTokens(beam.DoFn):
    """(shard, [(row, request), ...]) -> (request, (text, tokens)) for every request."""

    def __init__(self, store_path: str):
        self.store_path = store_path
        self.rows_read = Metrics.counter("edje_rerank", "token_rows_read")

    def setup(self):
        self.store = TokenStore(self.store_path)

    def process(self, element):
        shard, routed = element
        by_row = {}
        for row, request in routed:
            by_row.setdefault(row, []).append(request)
        rows = sorted(by_row)
        for start in range(0, len(rows), ROWS_PER_READ):
            chunk = rows[start:start + ROWS_PER_READ]
            _, tokens, _ = self.store.read_rows(shard, chunk)
            self.rows_read.inc(len(chunk))
            for row, t in zip(chunk, tokens):
                for request in by_row[row]:
                    yield request, (request.text, t)


class ScorePairs(beam.PTransform):
    def __init__(self, store_path: str, handler: JointScorerHandler):
        super().__init__()
        self.store_path, self.handler = store_path, handler

    def expand(self, routed):
        return (routed
                | "GroupByShard" >> beam.GroupByKey()
                | "ReadTokenRows" >> beam.ParDo(_ReadTokens(self.store_path))
                | "JointEncoder" >> RunInference(KeyedModelHandler(self.handler))
                | "Logit" >> beam.MapTuple(lambda request, logit: (request, float(logit))))
