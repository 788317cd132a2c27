"""Beam step: (request, logit) -> one ranked row per (query, candidate)."""
import apache_beam as beam

FUSIONS = ("auto", "none", "add_first_stage")


def resolve_fusion(fusion: str, weight, checkpoint_weight: float):
    """-> ("none" | "add_first_stage", weight). ``auto``: the checkpoint's learnt fusion weight when it
    has one, else the logit alone; a missing ``weight`` takes the checkpoint's (else 1.0)."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}")
    if fusion == "auto":
        fusion = "add_first_stage" if checkpoint_weight else "none"
    if weight is None:
        weight = checkpoint_weight or 1.0
    return fusion, float(weight)


def rank_query(query_id, scored, fusion: str = "none", weight: float = 1.0, top_k: int = 0):
    """scored: [(image_id, logit, first_stage_score)] -> rows ranked 1..n (best first).

    With ``add_first_stage`` the ranking key is logit + weight * first_stage_score (the raw logit
    stays in ``score``; the key is ``fused_score``). Ties break on image_id.
    """
    rows = []
    for image_id, logit, first in scored:
        key = logit
        if fusion == "add_first_stage" and first is not None:
            key = logit + weight * first
        rows.append((-key, image_id, logit, first, key))
    rows.sort()
    if top_k:
        rows = rows[:top_k]
    out = []
    for rank, (_, image_id, logit, first, key) in enumerate(rows, start=1):
        row = {"query_id": query_id, "image_id": image_id, "rank": rank, "score": logit,
               "first_stage_score": first}
        if fusion != "none":
            row["fused_score"] = key
        out.append(row)
    return out


class RankScores(beam.PTransform):
    def __init__(self, fusion: str = "none", weight: float = 1.0, top_k: int = 0):
        super().__init__()
        if fusion not in ("none", "add_first_stage"):
            raise ValueError("fusion must be none or add_first_stage (resolve 'auto' with resolve_fusion)")
        self.fusion, self.weight, self.top_k = fusion, weight, top_k

    def expand(self, scored):
        fusion, weight, top_k = self.fusion, self.weight, self.top_k
        return (scored
                | "KeyByQuery" >> beam.MapTuple(
                    lambda req, logit: (req.query_id, (req.image_id, logit, req.first_stage_score)))
                | "GroupByQuery" >> beam.GroupByKey()
                | "Rank" >> beam.FlatMapTuple(lambda qid, items: rank_query(qid, list(items), fusion, weight, top_k)))
