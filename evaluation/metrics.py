"""Recall@k of the first stage and of the reranked order, text->image and image->text.

The ranking rules are pipeline/evaluate.py's ("Metrics").
"""
from collections import Counter
from typing import Dict, List, Optional

from evaluation.inputs import EvaluateError, Query, Scored

DEFAULT_KS = (1, 5, 10)


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
    to an evaluated query, its candidate queries ranked as pipeline/evaluate.py's docstring says."""
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
