"""What every engine's run of the jobs is compared by: retrieve + rerank over a store, and the
DirectRunner's candidates and scores (the same lines, the same ranks, scores within 1e-6)."""
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import rerank, retrieve

DIRECT = ["--runner=DirectRunner", "--progress=off"]


def retrieve_and_rerank(store, queries, flags, out_dir: Path, name: str):
    """-> (candidates path, scores path, rerank summary)."""
    cands = out_dir / f"{name}.jsonl"
    retrieve.run(["--queries", str(queries), "--store", str(store), "--top_k", "5", "--output", str(cands), *flags])
    scores = out_dir / f"{name}.parquet"
    summary = rerank.run(["--queries", str(cands), "--store", str(store), "--output", str(scores), *flags])
    return cands, scores, summary


def lines(path: Path) -> set:
    return set(path.read_text().splitlines())


def scores_by_pair(path):
    t = pq.read_table(path).to_pydict()
    return {(q, i): (r, s) for q, i, r, s in zip(t["query_id"], t["image_id"], t["rank"], t["score"])}


def assert_same_as_direct(engine, direct):
    (ec, es, esum), (dc, ds, dsum) = engine, direct
    # the same lines (a file's line order follows the runner's; rows are keyed by query_id)
    assert lines(ec) == lines(dc) and len(lines(dc)) == len(ec.read_text().splitlines())
    assert lines(ec.with_suffix(".failures.jsonl")) == lines(dc.with_suffix(".failures.jsonl"))
    engine_scores, direct_scores = scores_by_pair(es), scores_by_pair(ds)
    assert engine_scores.keys() == direct_scores.keys() and len(engine_scores) > 0
    assert max(abs(engine_scores[k][1] - direct_scores[k][1]) for k in direct_scores) <= 1e-6
    assert all(engine_scores[k][0] == direct_scores[k][0] for k in direct_scores)
    keep = ("queries_scored", "pairs", "failures")
    assert {k: esum[k] for k in keep} == {k: dsum[k] for k in keep}
