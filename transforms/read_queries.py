"""Beam step: query files (JSONL or Parquet, globs) -> validated queries + failure records.

Each file is read by one worker in order, so every failure names its ``file:line`` (or
``file:row`` for Parquet). Queries whose id appeared earlier (file order, then line) are failures
too: one query id, one ranking.
"""
import json
import logging
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import queries as Q
from schemas import storage

FAILURES = "failures"
log = logging.getLogger(__name__)


def plan_query_files(pattern: str):
    files = []
    for part in [p.strip() for p in pattern.split(",") if p.strip()]:
        try:
            files.extend(m.path for m in FileSystems.match([part])[0].metadata_list)
        except Exception as e:  # a literal path that does not exist raises on some filesystems
            log.warning("query files %r: %s", part, e)
    return sorted(set(files))


def count_candidates(pattern: str) -> int:
    """Candidates listed by the query files (malformed lines count none): the progress bar's total."""
    total = 0
    for path in plan_query_files(pattern):
        with storage.open_read(path) as f:
            if path.lower().endswith(".parquet"):
                column = pq.read_table(pa.PythonFile(f, mode="r"), columns=[Q.CANDIDATES]).column(0)
                total += sum(len(c or ()) for c in column.to_pylist())
                continue
            for line in _lines(f):
                try:
                    candidates = json.loads(line).get(Q.CANDIDATES) or ()
                except (ValueError, AttributeError):
                    continue
                total += len(candidates) if isinstance(candidates, list) else 0
    return total


@beam.typehints.with_output_types(Any)
class _ReadFile(beam.DoFn):
    def __init__(self, require_candidates: bool):
        self.require_candidates = require_candidates

    def process(self, element):
        order, path = element
        if path.lower().endswith(".parquet"):
            yield from self._parquet(order, path)
            return
        with storage.open_read(path) as f:
            for n, line in enumerate(_lines(f), start=1):
                q, fail = Q.parse_line(line, f"{path}:{n}", self.require_candidates)
                if fail is not None:
                    yield beam.pvalue.TaggedOutput(FAILURES, fail)
                elif q is not None:
                    yield (order, n, path), q

    def _parquet(self, order, path):
        try:
            with storage.open_read(path) as f:
                table = pq.read_table(pa.PythonFile(f, mode="r"))
        except Exception as e:
            yield beam.pvalue.TaggedOutput(FAILURES, Q.failure(Q.BAD_JSON, path, detail=f"unreadable Parquet: {e}"))
            return
        for n, row in enumerate(table.to_pylist(), start=1):
            try:
                yield (order, n, path), Q.validate(row, self.require_candidates)
            except Q.QueryError as e:
                yield beam.pvalue.TaggedOutput(FAILURES, Q.failure(e.reason, f"{path}:{n}", e.query_id, detail=e.detail))


def _lines(f):
    """Lines of a binary stream, each capped: a line past the cap is cut to cap + 1 bytes so the
    parser can refuse it without holding all of it."""
    buf = b""
    while True:
        block = f.read(1 << 20)
        if not block:
            break
        buf += block
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > Q.MAX_LINE_BYTES:
                    # Swallow the rest of this over-long line.
                    yield buf[: Q.MAX_LINE_BYTES + 1]
                    buf = _skip_line(f)
                break
            yield buf[:nl]
            buf = buf[nl + 1:]
    if buf:
        yield buf


def _skip_line(f):
    while True:
        block = f.read(1 << 20)
        if not block:
            return b""
        nl = block.find(b"\n")
        if nl >= 0:
            return block[nl + 1:]


@beam.typehints.with_output_types(Any)
def _first_per_id(element):
    qid, items = element
    items = sorted(items, key=lambda kv: kv[0])
    yield items[0][1]
    for (_, n, path), q in items[1:]:
        yield beam.pvalue.TaggedOutput(FAILURES, Q.failure(Q.DUPLICATE_QUERY, f"{path}:{n}", qid,
                                                           detail="an earlier query has this id"))


class ReadQueries(beam.PTransform):
    """pattern -> tagged outputs ``queries`` (dicts) and ``failures`` (failure records)."""

    def __init__(self, pattern: str, require_candidates: bool):
        super().__init__()
        self.pattern, self.require_candidates = pattern, require_candidates

    def expand(self, pbegin):
        pattern = self.pattern
        read = (pbegin
                | "QueryFilePattern" >> beam.Create([None])
                | "MatchQueryFiles" >> beam.FlatMap(lambda _: list(enumerate(plan_query_files(pattern))))
                | "SpreadQueryFiles" >> beam.Reshuffle()
                | "ParseQueries" >> beam.ParDo(_ReadFile(self.require_candidates)).with_outputs(FAILURES, main="queries"))
        unique = (read.queries
                  | "KeyByQueryId" >> beam.Map(lambda kv: (kv[1][Q.QUERY_ID], kv))
                  | "GroupByQueryId" >> beam.GroupByKey()
                  | "FirstPerQueryId" >> beam.FlatMap(_first_per_id).with_outputs(FAILURES, main="queries"))
        failures = (read.failures, unique.failures) | "AllQueryFailures" >> beam.Flatten()
        return {"queries": unique.queries, "failures": failures}
