"""Reading evaluate's inputs: the query file (candidates, relevant) and rerank's scores file.

Both are checked as a whole; input that cannot be evaluated raises EvaluateError naming the query.
The rules are pipeline/evaluate.py's ("Which queries are evaluated", "Bad scores files").
"""
import json
import logging
import math
from collections import Counter
from typing import Dict, List, NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import queries as Q
from schemas import storage

log = logging.getLogger(__name__)

BAD_RELEVANT = "invalid_relevant"
REQUIRED_SCORE_COLUMNS = ("query_id", "image_id", "rank", "score")
MAX_PROBLEMS_SHOWN = 10


class EvaluateError(Exception):
    """Input that cannot be evaluated; the message names the query."""


class Query(NamedTuple):
    query_id: str
    text: str
    candidates: List[str]  # unique, first-stage order
    first_scores: Optional[List[float]]  # same order; None when the query had no candidate_scores
    relevant: Optional[frozenset]  # None or empty: not evaluated


class Scored(NamedTuple):
    image_id: str
    rank: int
    key: float  # the rerank score used for I2T (fused_score if present, else score)
    logit: Optional[float] = None  # the joint encoder's own score
    fused: bool = False  # the row has a fused_score (rank is by the fused sum)


def _relevant(value):
    """The ``relevant`` field -> frozenset of ids, or None (absent/empty); raises on a bad value."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise Q.QueryError(BAD_RELEVANT, "relevant must be a list of image ids")
    return frozenset(str(v) for v in value) or None


def _to_query(obj):
    """A parsed record -> (Query, number of repeated candidates dropped); raises QueryError."""
    q = Q.validate(obj, require_candidates=False)
    try:
        relevant = _relevant(q.get(Q.RELEVANT))
    except Q.QueryError as e:
        raise Q.QueryError(e.reason, e.detail, q[Q.QUERY_ID]) from None
    kept, dropped = Q.unique_candidates(q) if q.get(Q.CANDIDATES) is not None else ([], [])
    has_scores = q.get(Q.CANDIDATE_SCORES) is not None
    return Query(q[Q.QUERY_ID], q[Q.TEXT], [c for c, _ in kept],
                 [s for _, s in kept] if has_scores else None, relevant), len(dropped)


def _records(path):
    """(source, parsed record, None) or (source, None, failure reason) per line / row of a query file."""
    if path.lower().endswith(".parquet"):
        try:
            with storage.open_read(path) as f:
                table = pq.read_table(pa.PythonFile(f, mode="r"))
        except Exception as e:
            log.warning("%s: unreadable Parquet (%s)", path, e)
            yield path, None, Q.BAD_JSON
            return
        for n, row in enumerate(table.to_pylist(), start=1):
            yield f"{path}:{n}", row, None
        return
    with storage.open_read(path) as f:
        data = f.read()
    for n, line in enumerate(data.split(b"\n"), start=1):
        source = f"{path}:{n}"
        if len(line) > Q.MAX_LINE_BYTES:
            yield source, None, Q.LINE_TOO_LONG
        elif line.strip():
            try:
                yield source, json.loads(line), None
            except (UnicodeDecodeError, json.JSONDecodeError):
                yield source, None, Q.BAD_JSON


def load_queries(pattern: str):
    """Query files -> ({query_id: Query} in file order, Counter of failure reasons, duplicate candidates)."""
    from transforms.read_queries import plan_query_files
    files = plan_query_files(pattern)
    if not files:
        raise EvaluateError(f"no query file matches {pattern!r}")
    queries, invalid, duplicate_candidates = {}, Counter(), 0
    for path in files:
        for source, obj, bad in _records(path):
            if bad is not None:
                invalid[bad] += 1
                log.warning("%s: skipped (%s)", source, bad)
                continue
            try:
                q, dropped = _to_query(obj)
            except Q.QueryError as e:
                invalid[e.reason] += 1
                log.warning("%s: query skipped (%s)", source, e)
                continue
            if q.query_id in queries:
                invalid[Q.DUPLICATE_QUERY] += 1
                log.warning("%s: query %r skipped (%s)", source, q.query_id, Q.DUPLICATE_QUERY)
                continue
            queries[q.query_id] = q
            duplicate_candidates += dropped
    return queries, invalid, duplicate_candidates


def _score_rows(path: str):
    fmt = "jsonl" if path.lower().endswith((".jsonl", ".json")) else "parquet"
    try:
        with storage.open_read(path) as f:
            if fmt == "parquet":
                table = pq.read_table(pa.PythonFile(f, mode="r"))
                missing = [c for c in REQUIRED_SCORE_COLUMNS if c not in table.column_names]
                if missing:
                    raise EvaluateError(f"scores file {path}: no column {', '.join(missing)}")
                return table.to_pylist()
            data = f.read()
    except EvaluateError:
        raise
    except Exception as e:
        raise EvaluateError(f"cannot read scores file {path}: {type(e).__name__}: {e}") from None
    rows = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvaluateError(f"scores file {path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise EvaluateError(f"scores file {path}:{n}: not a JSON object")
        rows.append(row)
    return rows


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_scores(path: str, queries: Dict[str, Query]) -> Dict[str, List[Scored]]:
    """The scores file -> {query_id: [Scored] by rank}. Raises EvaluateError on any bad row."""
    problems = []
    by_query: Dict[str, List[Scored]] = {}
    seen = set()
    candidate_sets = {}
    for row in _score_rows(path):
        qid, image_id = row.get("query_id"), row.get("image_id")
        qid = str(qid) if isinstance(qid, int) and not isinstance(qid, bool) else qid
        image_id = str(image_id) if isinstance(image_id, int) and not isinstance(image_id, bool) else image_id
        missing = [c for c in REQUIRED_SCORE_COLUMNS if row.get(c) is None]
        if missing:
            problems.append(f"query {qid!r}: a row without {', '.join(missing)}")
            continue
        if not isinstance(qid, str) or not isinstance(image_id, str):
            problems.append(f"query {qid!r}: query_id and image_id must be strings")
            continue
        if qid not in queries:
            problems.append(f"query {qid!r}: scored, but not a valid query of the query file")
            continue
        cands = candidate_sets.setdefault(qid, set(queries[qid].candidates))
        if image_id not in cands:
            problems.append(f"query {qid!r}: image {image_id!r} scored but not among its candidates")
            continue
        if (qid, image_id) in seen:
            problems.append(f"query {qid!r}: image {image_id!r} has more than one scores row")
            continue
        seen.add((qid, image_id))
        rank = row["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool):
            problems.append(f"query {qid!r}: image {image_id!r} has a non-integer rank {rank!r}")
            continue
        fused = row.get("fused_score")
        key = row["score"] if fused is None else fused
        if not _number(row["score"]) or not _number(key):
            problems.append(f"query {qid!r}: image {image_id!r} has a non-finite score")
            continue
        by_query.setdefault(qid, []).append(Scored(image_id, rank, float(key), float(row["score"]), fused is not None))
    for qid in sorted(by_query):
        items = sorted(by_query[qid], key=lambda s: s.rank)
        ranks = [s.rank for s in items]
        if ranks != list(range(1, len(items) + 1)):
            problems.append(f"query {qid!r}: ranks are not 1..{len(items)} "
                            f"(got {ranks[:10]}{' ...' if len(ranks) > 10 else ''})")
        by_query[qid] = items
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise EvaluateError(f"scores file {path} does not match the query file "
                            f"({len(problems)} problem(s)):\n  {shown}{more}")
    return by_query
