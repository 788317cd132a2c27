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
import logging
import sys

from evaluation.inputs import EvaluateError, load_queries, load_scores
from evaluation.metrics import DEFAULT_KS, evaluate, t2i_rankings
from evaluation.report import markdown_table, write_report
from evaluation.strips import write_strips
from pipeline._cli import add_filesystem_flags, apply_filesystem_flags, finish
from schemas import storage


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
        from transforms.shard_files import PatternError, plan_shards
        try:
            shards = plan_shards(args.images).shards
        except PatternError as e:
            raise EvaluateError(f"--images: {e}") from None
        if not shards:
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
