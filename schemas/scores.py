"""The rerank output: one row per scored (query, candidate)."""
import pyarrow as pa


def scores_schema(fused: bool) -> pa.Schema:
    fields = [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),  # the joint encoder's logit
        pa.field("first_stage_score", pa.float64()),
    ]
    if fused:
        fields.append(pa.field("fused_score", pa.float64(), nullable=False))
    return pa.schema(fields)
