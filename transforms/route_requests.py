"""Beam step: queries -> scoring requests routed to the token shard that holds each image.

Queries are exploded into one request per (query, candidate); requests are grouped by the id
index bucket of their image, each bucket file is read once to find (shard, row), and requests are
keyed by shard. Only requests move through the shuffle (ids and query text), never tokens.
"""
from typing import Any, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import queries as Q
from schemas.reader import TokenStore

MISSING = "missing"
MAX_SCORED_TEXT_CHARS = 4096  # the joint encoder reads only its first max_text_tokens tokens


class Request(NamedTuple):
    query_id: str
    image_id: str
    text: str
    first_stage_score: Optional[float]


@beam.typehints.with_output_types(Any)
def explode(query):
    """A query -> its requests (candidates de-duplicated, first kept); duplicates as failures."""
    kept, dropped = Q.unique_candidates(query)
    text = query[Q.TEXT][:MAX_SCORED_TEXT_CHARS]
    for image_id, score in kept:
        yield Request(query[Q.QUERY_ID], image_id, text, score)
    for image_id in dropped:
        yield beam.pvalue.TaggedOutput(MISSING, Q.failure(
            Q.DUPLICATE_CANDIDATE, "queries", query[Q.QUERY_ID], image_id,
            "candidate listed more than once; scored once"))


@beam.typehints.with_output_types(Any)  # mixed main/tagged outputs: let the next GroupByKey accept pairs
class _LookupBucket(beam.DoFn):
    def __init__(self, store_path: str):
        self.store_path = store_path
        self.missing = Metrics.counter("edje_rerank", "candidates_not_in_store")

    def setup(self):
        self.store = TokenStore(self.store_path)

    def process(self, element):
        bucket, requests = element
        requests = list(requests)
        where = self.store.lookup_bucket(bucket, {r.image_id for r in requests})
        for r in requests:
            if r.image_id in where:
                shard, row = where[r.image_id]
                yield shard, (row, r)
            else:
                self.missing.inc()
                yield beam.pvalue.TaggedOutput(MISSING, Q.failure(
                    Q.NOT_IN_STORE, "store", r.query_id, r.image_id, "candidate id not in the token store"))


class RouteRequests(beam.PTransform):
    """queries -> {"routed": (shard, (row, Request)), "failures": failure records}."""

    def __init__(self, store_path: str, buckets: int):
        super().__init__()
        self.store_path, self.buckets = store_path, buckets

    def expand(self, queries):
        from schemas import index as idx
        buckets = self.buckets
        requests = queries | "ExplodeQueries" >> beam.FlatMap(explode).with_outputs(MISSING, main="requests")
        routed = (requests.requests
                  | "KeyByIndexBucket" >> beam.Map(lambda r: (idx.bucket_of(r.image_id, buckets), r))
                  | "GroupByIndexBucket" >> beam.GroupByKey()
                  | "LookupIds" >> beam.ParDo(_LookupBucket(self.store_path)).with_outputs(MISSING, main="routed"))
        failures = (requests[MISSING], routed[MISSING]) | "RoutingFailures" >> beam.Flatten()
        return {"routed": routed.routed, "failures": failures}
