"""Query files (JSONL or Parquet) and the records that fail in them.

A query record: ``query_id`` (string; an integer is taken as its decimal string), ``text``
(non-empty string), optional ``candidates`` (list of image ids), ``candidate_scores``
(first-stage similarities, same length) and any other fields (``relevant``, ...), which jobs
pass through unchanged.

Malformed input never stops a job: each bad line or query becomes a failure record
``{query_id, image_id, source, reason}`` (``source`` is ``file:line``), and the rest goes on.
"""
import json
import math
from typing import Optional

QUERY_ID = "query_id"
TEXT = "text"
CANDIDATES = "candidates"
CANDIDATE_SCORES = "candidate_scores"
RELEVANT = "relevant"

MAX_LINE_BYTES = 4 << 20  # a JSONL line (one query) larger than this is refused
MAX_CANDIDATES = 100_000

# Failure reasons (stable strings: tests and users match on them).
BAD_JSON = "invalid_json"
BAD_QUERY_ID = "missing_or_invalid_query_id"
BAD_TEXT = "missing_or_empty_text"
BAD_CANDIDATES = "invalid_candidates"
NO_CANDIDATES = "no_candidates"
BAD_SCORES = "invalid_candidate_scores"
LINE_TOO_LONG = "line_too_long"
DUPLICATE_QUERY = "duplicate_query_id"
DUPLICATE_CANDIDATE = "duplicate_candidate"
NOT_IN_STORE = "not_in_store"


class QueryError(ValueError):
    def __init__(self, reason: str, detail: str = "", query_id: Optional[str] = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.query_id = reason, detail, query_id


def failure(reason: str, source: str, query_id=None, image_id=None, detail: str = "") -> dict:
    return {"query_id": query_id, "image_id": image_id, "source": source,
            "reason": reason, "detail": detail[:500]}


def _query_id(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value) <= 1024:
        return value
    return None


def validate(obj, require_candidates: bool) -> dict:
    """A parsed record -> a clean query dict (candidates de-duplicated: see ``dropped``)."""
    if not isinstance(obj, dict):
        raise QueryError(BAD_JSON, "a query must be a JSON object")
    qid = _query_id(obj.get(QUERY_ID))
    if qid is None:
        raise QueryError(BAD_QUERY_ID, f"query_id must be a non-empty string, got {obj.get(QUERY_ID)!r:.80}")
    text = obj.get(TEXT)
    if not isinstance(text, str) or not text.strip():
        raise QueryError(BAD_TEXT, "text must be a non-empty string", qid)
    q = dict(obj)
    q[QUERY_ID] = qid
    cands = obj.get(CANDIDATES)
    if cands is None:
        if require_candidates:
            raise QueryError(NO_CANDIDATES, "no candidates field", qid)
        return q
    if not isinstance(cands, list) or len(cands) > MAX_CANDIDATES or \
            not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in cands):
        raise QueryError(BAD_CANDIDATES, f"candidates must be a list of at most {MAX_CANDIDATES} ids", qid)
    cands = [str(c) for c in cands]
    if require_candidates and not cands:
        raise QueryError(NO_CANDIDATES, "empty candidate list", qid)
    scores = obj.get(CANDIDATE_SCORES)
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != len(cands) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise QueryError(BAD_SCORES, "candidate_scores must be finite numbers, one per candidate", qid)
    q[CANDIDATES] = cands
    if scores is not None:
        q[CANDIDATE_SCORES] = [float(s) for s in scores]
    return q


def unique_candidates(q: dict):
    """[(image_id, first_stage_score or None)] in order, first occurrence kept; and the dropped ids."""
    seen, kept, dropped = set(), [], []
    scores = q.get(CANDIDATE_SCORES) or [None] * len(q[CANDIDATES])
    for image_id, score in zip(q[CANDIDATES], scores):
        if image_id in seen:
            dropped.append(image_id)
        else:
            seen.add(image_id)
            kept.append((image_id, score))
    return kept, dropped


def parse_line(line: bytes, source: str, require_candidates: bool):
    """One JSONL line -> (query, None) or (None, failure). Blank lines -> (None, None)."""
    if len(line) > MAX_LINE_BYTES:
        return None, failure(LINE_TOO_LONG, source, detail=f"{len(line)} bytes > {MAX_LINE_BYTES}")
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, failure(BAD_JSON, source, detail=str(e))
    try:
        return validate(obj, require_candidates), None
    except QueryError as e:
        return None, failure(e.reason, source, query_id=e.query_id, detail=e.detail)
