"""Evaluate: recall@k of the first stage and of the reranked order, text->image and image->text.

    python -m pipeline.evaluate --queries CANDIDATES.jsonl --scores SCORES.parquet --output REPORT_DIR \\
        [--images SHARD_PATTERN] [--strips 6] [--ks 1,5,10]

A plain job (no Beam: the inputs are one query file and one scores file, small).

Inputs
  --queries  the query file format (JSONL or Parquet; globs, comma-separated patterns), as
             pipeline.retrieve writes it: query_id, text, candidates, candidate_scores (first-stage
             order) and ``relevant`` (list of image ids, the ground truth).
  --scores   pipeline.rerank's output (Parquet, or JSONL when the name ends in .jsonl/.json):
             query_id, image_id, rank (1 = best), score, first_stage_score, fused_score (with fusion).

Metrics (percentages, 2 decimals)
  T2I  Per query, first stage: its candidates in the file's order (a candidate listed twice counts
       once, at its first position; equal candidate_scores are NOT re-sorted: the list order is
       the ranking). Reranked: the candidates with a scores row ordered by ``rank``, then the
       candidates without one (not in the store, cut by rerank --top_k, query not scored at all)
       in first-stage order. R@k = share of evaluated queries with a relevant image in the top k.
       ``counts.t2i_candidate_recall`` (a relevant image anywhere in the candidates) is the
       ceiling of any reranking.
  I2T  For each image relevant to at least one evaluated query: the evaluated queries whose
       candidates contain it, ranked by first-stage score (candidate_scores; pairs of a query
       without candidate_scores go after the others, by candidate position) and by the rerank
       score (``fused_score`` when the scores file has it, the score rerank ranked by, else
       ``score``; pairs without a scores row go after all scored ones, in first-stage order).
       Equal scores break by query_id. R@k = share of those images with one of their true
       queries in the top k; an image in no candidate list counts as a miss
       (``counts.i2t_candidate_recall`` is the I2T ceiling).

Which queries are evaluated
  Malformed queries are skipped with the reasons of schemas/queries.py (the same as retrieve and
  rerank; a repeated query_id keeps the first one, file order), plus ``invalid_relevant``
  (``relevant`` not a list of ids); they are counted in ``counts.invalid_queries`` by reason.
  Queries whose ``relevant`` is missing, null or empty are skipped and counted
  (``counts.queries_without_relevant``); they are not I2T distractors either, as their truth is
  unknown. A query with no candidates is evaluated (a miss at every k). If no query is left to
  evaluate, the job fails (exit status 1).

Bad scores files: exit status 1 with a message naming the query (and image)
  A scores row whose query_id is not a valid query of --queries, a row whose image is not among
  that query's candidates, two rows for one (query, image), ranks of a query that are not exactly
  1..n (n = its rows), a missing column, a non-integer rank or a non-finite score. The scores
  file is checked as a whole (queries without ``relevant`` included): such a file does not
  belong to these candidates, and no recall is computed from it.

Outputs (REPORT_DIR, a local directory, created if needed)
  report.json     {"t2i": {"first_stage": {"R@1": .., ...}, "reranked": {...}},
                   "i2t": {same}, "counts": {...}} (one R@k per --ks); when the scores file has
                   ``fused_score`` (rerank fused the first stage in), "reranked" is that fused order
                   and "joint_encoder" is the same candidates ranked by the logit ``score`` alone
  report.md       Markdown table (rows first stage / [joint encoder alone] / reranked / delta;
                   T2I and I2T R@k) + counts
  recall_at_k.png recall@k for k = 1..the longest ranking, first stage vs reranked, T2I and I2T
  strips/<query_id>.png  with --images (WebDataset shards holding the candidate images): for
                  the first --strips evaluated queries by query_id, the query text over two rows
                  of thumbnails (first stage top 5, reranked top 5), relevant images framed in
                  green, others in grey. A query_id that is not a safe file name ([A-Za-z0-9._-],
                  not starting with a dot) is cleaned and gets a hash suffix. Stale strips/*.png
                  from an earlier run are removed. An image not found in the shards, or
                  undecodable, is drawn as a labelled placeholder.
Stdout: the Markdown table and the report path.
"""
import argparse
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import textwrap
from collections import Counter
from typing import Dict, List, NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline._cli import add_filesystem_flags, apply_filesystem_flags, finish
from schemas import queries as Q
from schemas import storage

log = logging.getLogger(__name__)

BAD_RELEVANT = "invalid_relevant"
DEFAULT_KS = (1, 5, 10)
STRIP_TOP = 5
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


# ---------------------------------------------------------------- reading


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


# ---------------------------------------------------------------- rankings and recall


def t2i_rankings(queries: Dict[str, Query], scores: Dict[str, List[Scored]]):
    """{query_id: (first-stage image ids, reranked image ids)} for the evaluated queries."""
    out = {}
    for qid, q in queries.items():
        if not q.relevant:
            continue
        scored = [s.image_id for s in scores.get(qid, [])]
        done = set(scored)
        out[qid] = (list(q.candidates), scored + [c for c in q.candidates if c not in done])
    return out


def i2t_rankings(queries: Dict[str, Query], scores: Dict[str, List[Scored]]):
    """{image_id: (first-stage query ids, reranked query ids, true query ids)}: every image relevant
    to an evaluated query, its candidate queries ranked as the module docstring says."""
    evaluated = {qid: q for qid, q in queries.items() if q.relevant}
    truth: Dict[str, set] = {}
    for qid, q in evaluated.items():
        for image_id in q.relevant:
            truth.setdefault(image_id, set()).add(qid)
    pairs: Dict[str, list] = {image_id: [] for image_id in truth}
    for qid, q in evaluated.items():
        rerank_key = {s.image_id: s.key for s in scores.get(qid, [])}
        for pos, image_id in enumerate(q.candidates):
            if image_id not in pairs:
                continue
            if q.first_scores is not None:
                first = (0, -q.first_scores[pos], qid)
            else:
                first = (1, pos, qid)
            rr = rerank_key.get(image_id)
            reranked = (0, -rr, qid) if rr is not None else (1,) + first
            pairs[image_id].append((first, reranked, qid))
    out = {}
    for image_id in sorted(truth):
        items = pairs[image_id]
        first = [qid for _, _, qid in sorted(items, key=lambda p: p[0])]
        reranked = [qid for _, _, qid in sorted(items, key=lambda p: p[1])]
        out[image_id] = (first, reranked, truth[image_id])
    return out


def joint_encoder_alone(scores: Dict[str, List[Scored]]) -> Optional[Dict[str, List[Scored]]]:
    """With fused scores: the same rows re-ranked by the joint encoder's logit alone (ties by
    image_id), keyed by it; None when no row is fused."""
    if not any(s.fused for rows in scores.values() for s in rows):
        return None
    out = {}
    for qid, rows in scores.items():
        ordered = sorted(rows, key=lambda s: (-s.logit, s.image_id))
        out[qid] = [Scored(s.image_id, r, s.logit, s.logit) for r, s in enumerate(ordered, start=1)]
    return out


def hits_at(ranking, truth, k: int) -> bool:
    return any(x in truth for x in ranking[:k])


def recall(rankings: Dict[str, tuple], truth_of, which: int, k: int) -> float:
    """Percentage of rankings with a true item in the top k (unrounded); 0 for no rankings."""
    if not rankings:
        return 0.0
    hits = sum(hits_at(r[which], truth_of(key, r), k) for key, r in rankings.items())
    return 100.0 * hits / len(rankings)


def _pct(x: float) -> float:
    return round(x, 2)


def evaluate(queries: Dict[str, Query], scores: Dict[str, List[Scored]], ks=DEFAULT_KS,
             invalid: Optional[Counter] = None, duplicate_candidates: int = 0):
    """-> (report dict, curves {"t2i"|"i2t": {"first_stage"|"reranked": [R@1, R@2, ...]}})."""
    t2i = t2i_rankings(queries, scores)
    if not t2i:
        raise EvaluateError("no query to evaluate: no valid query has a non-empty 'relevant' list")
    i2t = i2t_rankings(queries, scores)
    t2i_truth = lambda qid, r: queries[qid].relevant  # noqa: E731
    i2t_truth = lambda image_id, r: r[2]  # noqa: E731
    report = {}
    curves = {}
    # With fusion, "reranked" is the fused order; the joint encoder alone gets its own row.
    alone = joint_encoder_alone(scores)
    alone_rankings = {"t2i": t2i_rankings(queries, alone), "i2t": i2t_rankings(queries, alone)} if alone else {}
    for mode, rankings, truth_of in (("t2i", t2i, t2i_truth), ("i2t", i2t, i2t_truth)):
        longest = max([len(r[0]) for r in rankings.values()] + [1])
        report[mode] = {name: {f"R@{k}": _pct(recall(rankings, truth_of, which, k)) for k in ks}
                        for which, name in ((0, "first_stage"), (1, "reranked"))}
        if alone:
            report[mode]["joint_encoder"] = {f"R@{k}": _pct(recall(alone_rankings[mode], truth_of, 1, k))
                                             for k in ks}
        curves[mode] = {name: [recall(rankings, truth_of, which, k) for k in range(1, longest + 1)]
                        for which, name in ((0, "first_stage"), (1, "reranked"))}
    evaluated = [queries[qid] for qid in t2i]
    n_cands = [len(q.candidates) for q in evaluated]
    unscored = sum(len(q.candidates) - len(scores.get(q.query_id, [])) for q in evaluated)
    ceiling_t2i = sum(bool(q.relevant & set(q.candidates)) for q in evaluated)
    ceiling_i2t = sum(bool(set(r[0]) & r[2]) for r in i2t.values())
    report["counts"] = {
        "ks": list(ks),
        "queries": len(evaluated),
        "queries_read": len(queries),
        "queries_without_relevant": len(queries) - len(evaluated),
        "invalid_queries": dict(sorted((invalid or {}).items())),
        "duplicate_candidates": duplicate_candidates,
        "mean_candidates_per_query": round(sum(n_cands) / len(evaluated), 2),
        "max_candidates_per_query": max(n_cands),
        "t2i_candidate_recall": _pct(100.0 * ceiling_t2i / len(evaluated)),
        "score_rows": sum(len(v) for v in scores.values()),
        "queries_without_scores": sum(1 for q in evaluated if not scores.get(q.query_id)),
        "unscored_candidates": unscored,
        "i2t_images": len(i2t),
        "i2t_images_in_no_candidate_list": sum(1 for r in i2t.values() if not r[0]),
        "i2t_mean_queries_per_image": round(sum(len(r[0]) for r in i2t.values()) / len(i2t), 2),
        "i2t_candidate_recall": _pct(100.0 * ceiling_i2t / len(i2t)),
        "i2t_pairs_without_first_stage_score": sum(
            1 for q in evaluated if q.first_scores is None for c in q.candidates if c in i2t),
    }
    return report, curves


# ---------------------------------------------------------------- report files


def markdown_table(report: dict) -> str:
    ks = report["counts"]["ks"]
    cols = [(mode, k) for mode in ("t2i", "i2t") for k in ks]
    lines = ["| | " + " | ".join(f"{m.upper()} R@{k}" for m, k in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    rows = [("first_stage", "first stage")]
    if "joint_encoder" in report["t2i"]:
        rows += [("joint_encoder", "joint encoder alone"), ("reranked", "reranked (fused)")]
    else:
        rows.append(("reranked", "reranked"))
    for name, label in rows:
        lines.append(f"| {label} | " + " | ".join(f"{report[m][name][f'R@{k}']:.2f}" for m, k in cols) + " |")
    deltas = [round(report[m]["reranked"][f"R@{k}"] - report[m]["first_stage"][f"R@{k}"], 2) for m, k in cols]
    lines.append("| delta | " + " | ".join(f"{d:+.2f}" for d in deltas) + " |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    c = report["counts"]
    invalid = ", ".join(f"{r}: {n}" for r, n in c["invalid_queries"].items()) or "none"
    return "\n".join([
        "# Recall@k: first stage vs reranked", "",
        markdown_table(report), "",
        f"- T2I: {c['queries']} queries evaluated ({c['queries_without_relevant']} without `relevant` skipped; "
        f"invalid: {invalid}), {c['mean_candidates_per_query']:.2f} candidates per query on average "
        f"(at most {c['max_candidates_per_query']}), candidate recall {c['t2i_candidate_recall']:.2f}% "
        "(the ceiling of reranking).",
        f"- Scores: {c['score_rows']} rows; {c['unscored_candidates']} candidates of evaluated queries unscored "
        f"(ranked after the scored ones, in first-stage order); {c['queries_without_scores']} queries without "
        "any score.",
        f"- I2T: {c['i2t_images']} images evaluated (relevant to at least one query), "
        f"{c['i2t_mean_queries_per_image']:.2f} candidate queries per image on average, "
        f"{c['i2t_images_in_no_candidate_list']} in no candidate list, "
        f"candidate recall {c['i2t_candidate_recall']:.2f}%.",
        "- Recalls are percentages. Curves: `recall_at_k.png`.", ""])


def plot_curves(curves: dict, counts: dict) -> bytes:
    """The recall@k curves as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    titles = {"t2i": f"Text -> image ({counts['queries']} queries)",
              "i2t": f"Image -> text ({counts['i2t_images']} images)"}
    xlabels = {"t2i": "k (images retrieved per query)", "i2t": "k (queries retrieved per image)"}
    for n, mode in enumerate(("t2i", "i2t")):
        ax = fig.add_subplot(1, 2, n + 1)
        for name, label, style in (("first_stage", "first stage", "o--"), ("reranked", "reranked", "s-")):
            ys = curves[mode][name]
            ax.plot(range(1, len(ys) + 1), ys, style, label=label, markersize=3)
        ax.set_title(titles[mode])
        ax.set_xlabel(xlabels[mode])
        ax.set_ylabel("recall@k (%)")
        ax.set_ylim(-2, 102)
        ax.set_xlim(0.5, max(len(curves[mode]["first_stage"]), 1) + 0.5)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Recall@k: first stage vs reranked")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _make_dir(path: str) -> None:
    if "://" not in path:  # object stores have no directories
        os.makedirs(path, exist_ok=True)


def write_report(out_dir: str, report: dict, curves: dict) -> None:
    _make_dir(out_dir)
    storage.write_bytes_atomic(storage.join(out_dir, "report.json"),
                               (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    storage.write_bytes_atomic(storage.join(out_dir, "report.md"), markdown_report(report).encode("utf-8"))
    storage.write_bytes_atomic(storage.join(out_dir, "recall_at_k.png"), plot_curves(curves, report["counts"]))


# ---------------------------------------------------------------- strips

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
THUMB = 128
PAD = 8
LABEL_W = 110
CAPTION_H = 16
FRAME = 4
GREEN, GREY = (0, 160, 60), (170, 170, 170)


def strip_file_name(query_id: str) -> str:
    clean = _SAFE_NAME.sub("_", query_id)[:100]
    if clean != query_id or not clean or clean.startswith("."):
        clean = f"{clean.lstrip('.') or 'query'}-{hashlib.sha256(query_id.encode()).hexdigest()[:10]}"
    return clean + ".png"


def load_images(pattern: str, wanted) -> dict:
    """{image_id: PIL image or a reason string} for the wanted ids found in the shards."""
    from transforms.image_decode import DecodeError, decode_image
    from transforms.shard_files import plan_shards
    from transforms.tar_samples import ShardReadError, iter_samples

    wanted, found = set(wanted), {}
    for spec in plan_shards(pattern).shards:
        if len(found) == len(wanted):
            break
        try:
            with storage.open_read(spec.source) as f:
                for sample in iter_samples(f):
                    if sample.key not in wanted or sample.key in found:
                        continue
                    ext = sample.image_extension()
                    if ext is None:
                        found[sample.key] = "no image"
                        continue
                    try:
                        image = decode_image(sample.members[ext])
                        image.thumbnail((THUMB - 2 * FRAME, THUMB - 2 * FRAME))
                        found[sample.key] = image
                    except DecodeError:
                        found[sample.key] = "undecodable"
        except ShardReadError as e:
            log.warning("%s: %s (images read before the damage are used)", spec.source, e)
        except OSError as e:
            log.warning("%s: unreadable (%s)", spec.source, e)
    return found


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support for the default font
        return ImageFont.load_default()


def _text(draw, xy, text, font, fill=(0, 0, 0)):
    try:
        draw.text(xy, text, font=font, fill=fill)
    except UnicodeEncodeError:  # the bitmap fallback font is Latin-1 only
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), font=font, fill=fill)


def render_strip(query: Query, first: List[str], reranked: List[str], images: dict) -> bytes:
    """One query's strip (first stage above, reranked below) as a PNG."""
    from PIL import Image, ImageDraw

    title_font, small = _font(15), _font(11)
    lines = textwrap.wrap(f"{query.query_id}: {query.text}", 85)[:3]
    top = PAD + 18 * len(lines) + PAD
    row_h = THUMB + CAPTION_H + PAD
    width = LABEL_W + STRIP_TOP * (THUMB + PAD) + PAD
    height = top + 2 * row_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(lines):
        _text(draw, (PAD, PAD + 18 * n), line, title_font)
    for r, (label, ranking) in enumerate((("first stage", first), ("reranked", reranked))):
        y = top + r * row_h
        _text(draw, (PAD, y + THUMB // 2 - 8), label, title_font)
        for i, image_id in enumerate(ranking[:STRIP_TOP]):
            x = LABEL_W + i * (THUMB + PAD)
            colour = GREEN if image_id in query.relevant else GREY
            draw.rectangle([x, y, x + THUMB - 1, y + THUMB - 1], fill=colour)
            draw.rectangle([x + FRAME, y + FRAME, x + THUMB - 1 - FRAME, y + THUMB - 1 - FRAME], fill=(240, 240, 240))
            image = images.get(image_id, "not found")
            if isinstance(image, str):
                _text(draw, (x + FRAME + 6, y + THUMB // 2 - 6), image, small, fill=(120, 0, 0))
            else:
                canvas.paste(image, (x + (THUMB - image.width) // 2, y + (THUMB - image.height) // 2))
            _text(draw, (x, y + THUMB + 2), f"#{i + 1} {image_id}"[:22], small)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def write_strips(out_dir: str, queries: Dict[str, Query], t2i: dict, pattern: str, count: int) -> List[str]:
    strip_dir = storage.join(out_dir, "strips")
    _make_dir(strip_dir)
    chosen = sorted(t2i)[:count]
    wanted = {i for qid in chosen for ranking in t2i[qid] for i in ranking[:STRIP_TOP]}
    images = load_images(pattern, wanted)
    written = []
    for qid in chosen:
        path = storage.join(strip_dir, strip_file_name(qid))
        storage.write_bytes_atomic(path, render_strip(queries[qid], t2i[qid][0], t2i[qid][1], images))
        written.append(path)
    storage.delete_quietly([p for p in storage.list_dir(strip_dir) if p.endswith(".png") and p not in written])
    return written


# ---------------------------------------------------------------- command line


def _ks(value: str):
    try:
        ks = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated integers, got {value!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError("--ks must list positive integers")
    return ks


def parser():
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", required=True, help="query file(s) with candidates and relevant: JSONL or "
                    "Parquet, globs and comma-separated patterns (retrieve's output works as is)")
    ap.add_argument("--scores", required=True, help="rerank's scores file: Parquet, or JSONL (.jsonl/.json)")
    ap.add_argument("--output", required=True, help="report directory: local (created if needed) or a gs://, "
                    "s3:// URL")
    ap.add_argument("--images", default=None, help="WebDataset shards holding the candidate images "
                    "(braces, globs, commas): draws strips/<query_id>.png")
    ap.add_argument("--strips", type=int, default=6, help="number of queries (by query_id) to draw with --images")
    ap.add_argument("--ks", type=_ks, default=list(DEFAULT_KS), help="k values of the report, e.g. 1,5,10")
    ap.fs_flags = add_filesystem_flags(ap)
    return ap


def run(argv=None) -> dict:
    """Runs the job; returns {"report": report dict, "output": dir, "strips": [paths], "table": md}.
    Raises EvaluateError on input it cannot evaluate."""
    ap = parser()
    args = ap.parse_args(argv)
    apply_filesystem_flags(args, ap.fs_flags)
    args.output = args.output.rstrip("/")
    if args.strips < 0:
        ap.error("--strips must be >= 0")
    if args.images:
        from transforms.shard_files import plan_shards
        if not plan_shards(args.images).shards:
            raise EvaluateError(f"no WebDataset shard matches --images {args.images!r}")
    queries, invalid, duplicates = load_queries(args.queries)
    scores = load_scores(args.scores, queries)
    report, curves = evaluate(queries, scores, args.ks, invalid, duplicates)
    write_report(args.output, report, curves)
    strips = []
    if args.images and args.strips:
        strips = write_strips(args.output, queries, t2i_rankings(queries, scores), args.images, args.strips)
    return {"report": report, "output": args.output, "strips": strips, "table": markdown_table(report)}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(argv)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result["table"])
    print(f"report: {storage.join(result['output'], 'report.json')}")
    return 0


if __name__ == "__main__":
    finish(main())
