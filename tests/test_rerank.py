"""Rerank: the Beam job on a real store, against the Python API and against fp32 tokens."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.checkpoint import load_joint_encoder, load_vision_encoder
from models.joint_encoder import score_batch
from models.reranker import Reranker
from pipeline import rerank
from schemas.reader import StoreError, TokenStore
from tests.conftest import BEAM_LOCAL, demo_members
from tests.test_models import small_checkpoint
from transforms.image_decode import decode_image
from transforms.joint_handler import JointScorerHandler

TEXTS = ["an astronaut in a white suit", "a tabby cat", "a cup of coffee", "a rocket on a launch pad",
         "gravel", "a page of printed text"]


def store_ids(store):
    return sorted(i for s in TokenStore(store).shards
                  for i in pq.read_table(f"{store}/shards/{s}.parquet", columns=["image_id"]).column(0).to_pylist())


@pytest.fixture(scope="module")
def queries(demo_store, tmp_path_factory):
    store, _ = demo_store
    ids = store_ids(store)
    rng = np.random.default_rng(0)
    rows = []
    for n, text in enumerate(TEXTS):
        cands = list(rng.choice(ids, size=10, replace=False))
        rows.append({"query_id": f"q{n}", "text": text, "candidates": cands,
                     "candidate_scores": [float(x) for x in rng.uniform(0, 1, 10)], "relevant": cands[:1]})
    rows[0]["candidates"] = rows[0]["candidates"] + ["not-an-id", rows[0]["candidates"][0]]
    rows[0]["candidate_scores"] = rows[0]["candidate_scores"] + [0.1, 0.2]
    d = tmp_path_factory.mktemp("queries")
    lines = [json.dumps(r) for r in rows] + [
        "{not json", json.dumps({"query_id": "empty", "text": "x", "candidates": []}),
        json.dumps({"query_id": "notext", "text": " ", "candidates": ids[:2]}),
        json.dumps({"text": "no id", "candidates": ids[:2]}),
        json.dumps({"query_id": "huge", "text": "word " * 200_000, "candidates": ids[:3]}),  # 1 MB text
        json.dumps({"query_id": "q1", "text": "duplicate id", "candidates": ids[:2]}),
    ]
    (d / "q.jsonl").write_text("\n".join(lines) + "\n")
    return d / "q.jsonl", rows, ids


def run_rerank(queries, store, output, *extra):
    return rerank.run(["--queries", str(queries), "--store", str(store), "--output", str(output), *BEAM_LOCAL[:1], *extra])


@pytest.fixture(scope="module")
def scored(demo_store, queries, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "scores.parquet"
    summary = run_rerank(queries[0], demo_store[0], out)
    return out, summary


def test_every_known_pair_scored_once_with_consistent_ranks(scored, queries):
    out, summary = scored
    rows = pq.read_table(out).to_pylist()
    by_query = {}
    for r in rows:
        by_query.setdefault(r["query_id"], []).append(r)
    expected = {q["query_id"]: set(q["candidates"]) - {"not-an-id"} for q in queries[1]}
    expected["huge"] = set(queries[2][:3])  # a 1 MB text is scored on its first max_text_tokens
    assert set(by_query) == set(expected)
    for qid, items in by_query.items():
        ids = [r["image_id"] for r in items]
        assert len(ids) == len(set(ids))
        assert set(ids) == expected[qid]
        items.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in items] == list(range(1, len(items) + 1))
        key = [r.get("fused_score", r["score"]) for r in items]  # fused when the checkpoint has a weight
        assert all(x >= y for x, y in zip(key, key[1:]))
    q0 = {r["image_id"]: r["first_stage_score"] for r in by_query["q0"]}
    first = queries[1][0]
    assert q0[first["candidates"][0]] == pytest.approx(first["candidate_scores"][0])  # first copy's score kept


def test_bad_queries_and_unknown_ids_are_reported_not_dropped(scored):
    out, summary = scored
    failures = [json.loads(l) for l in open(summary["failures_file"])]
    reasons = {(f["query_id"], f["reason"]) for f in failures}
    assert ("q0", "not_in_store") in reasons and ("q0", "duplicate_candidate") in reasons
    assert ("empty", "no_candidates") in reasons and ("notext", "missing_or_empty_text") in reasons
    assert ("q1", "duplicate_query_id") in reasons
    assert {f["reason"] for f in failures if f["query_id"] is None} == {"invalid_json", "missing_or_invalid_query_id"}
    located = [f for f in failures if f["reason"] == "invalid_json"]
    assert located[0]["source"].endswith("q.jsonl:7")
    assert summary["failures"] == len(failures) and summary["queries_scored"] == 7


def test_beam_scores_equal_api_scores(scored, demo_store, queries):
    out, _ = scored
    rows = [r for r in pq.read_table(out).to_pylist() if r["query_id"] != "huge"]
    text = {q["query_id"]: q["text"] for q in queries[1]}
    api = Reranker(demo_store[0]).score([(text[r["query_id"]], r["image_id"]) for r in rows])
    assert np.allclose(api, [r["score"] for r in rows], atol=1e-5)
    q2 = [r for r in rows if r["query_id"] == "q2"]
    ranked = Reranker(demo_store[0]).rank(text["q2"], [r["image_id"] for r in q2],
                                          first_stage_scores=[r["first_stage_score"] for r in q2])
    beam_order = [r["image_id"] for r in sorted(q2, key=lambda r: r["rank"])]
    assert [r["image_id"] for r in ranked] == beam_order


def test_fusion_follows_the_checkpoint_and_the_api_computes_first_stage_scores_like_retrieve(demo_store, tmp_path):
    from pipeline import retrieve
    from transforms.rank_scores import resolve_fusion
    assert resolve_fusion("auto", None, 0.0) == ("none", 1.0)
    assert resolve_fusion("auto", None, 12.5) == ("add_first_stage", 12.5)
    assert resolve_fusion("add_first_stage", None, 0.0) == ("add_first_stage", 1.0)
    assert resolve_fusion("none", 3.0, 12.5) == ("none", 3.0)
    store = demo_store[0]
    (tmp_path / "q.jsonl").write_text(json.dumps({"query_id": "a", "text": TEXTS[1]}) + "\n")
    retrieve.run(["--queries", str(tmp_path / "q.jsonl"), "--store", str(store), "--top_k", "6",
                  "--output", str(tmp_path / "c.jsonl"), *BEAM_LOCAL[:1]])
    cand = json.loads((tmp_path / "c.jsonl").read_text())
    rr = Reranker(store)
    assert np.allclose(rr.first_stage_scores(TEXTS[1], cand["candidates"]), cand["candidate_scores"], atol=1e-5)
    logits = rr.score([(TEXTS[1], i) for i in cand["candidates"]])
    fused = rr.rank(TEXTS[1], cand["candidates"], fusion=True)  # first-stage scores computed by the API
    w = rr.fusion_weight or 1.0
    key = {i: logits[k] + w * cand["candidate_scores"][k] for k, i in enumerate(cand["candidates"])}
    assert [r["image_id"] for r in fused] == sorted(key, key=lambda i: (-key[i], i))
    assert all(r["fused_score"] == pytest.approx(key[r["image_id"]], abs=1e-4) for r in fused)
    alone = rr.rank(TEXTS[1], cand["candidates"], fusion=False)
    assert "fused_score" not in alone[0] and [r["image_id"] for r in alone] == sorted(
        cand["candidates"], key=lambda i: (-logits[cand["candidates"].index(i)], i))
    with pytest.raises(ValueError, match="one score per image"):
        rr.rank(TEXTS[1], cand["candidates"], first_stage_scores=[0.1])


def test_int8_tokens_rank_like_fp32_adapter_tokens(demo_store):
    store = TokenStore(demo_store[0])
    encoder, _, _ = load_vision_encoder(None)
    joint, tokenizer, _, _ = load_joint_encoder(None)
    transform = encoder.backbone.image_transform()
    members = dict(m for s in range(3) for m in demo_members(s, 8))
    ids = store_ids(demo_store[0])
    images = []
    for i in ids:
        data = next(members[f"{i}.{e}"] for e in ("jpg", "png", "webp") if f"{i}.{e}" in members)
        images.append(transform(decode_image(data)))
    with torch.no_grad():
        fp32 = encoder(torch.stack(images))[0].numpy()
    found, int8, _, _ = store.get(ids)
    assert found == ids
    texts = [t for t in TEXTS for _ in ids]
    a = score_batch(joint, tokenizer, texts, np.concatenate([fp32] * len(TEXTS)))
    b = score_batch(joint, tokenizer, texts, np.concatenate([int8] * len(TEXTS)))
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    n = len(a)
    spearman = 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1))
    assert spearman >= 0.999


def test_top_k_fusion_and_jsonl_output(demo_store, queries, tmp_path):
    out = tmp_path / "s.jsonl"
    run_rerank(queries[0], demo_store[0], out, "--top_k", "3", "--fusion", "add_first_stage", "--fusion_weight", "2")
    rows = [json.loads(l) for l in open(out)]
    for qid in {r["query_id"] for r in rows}:
        items = sorted((r for r in rows if r["query_id"] == qid), key=lambda r: r["rank"])
        assert [r["rank"] for r in items] == [1, 2, 3]
        for r in items:
            first = r["first_stage_score"]  # a query without first-stage scores ranks by the logit
            assert r["fused_score"] == pytest.approx(r["score"] + (2 * first if first is not None else 0))
        assert all(a["fused_score"] >= b["fused_score"] for a, b in zip(items, items[1:]))
    assert (tmp_path / "s.failures.jsonl").exists()


def test_parquet_queries_and_mismatched_checkpoint(demo_store, queries, tmp_path):
    rows = queries[1][1:3]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    summary = run_rerank(tmp_path / "q.parquet", demo_store[0], tmp_path / "s.parquet")
    assert summary["pairs"] == 20 and summary["failures"] == 0
    small_checkpoint(tmp_path / "other")
    with pytest.raises(SystemExit, match="same checkpoint"):
        run_rerank(tmp_path / "q.parquet", demo_store[0], tmp_path / "t.parquet", "--checkpoint", str(tmp_path / "other"))
    with pytest.raises(KeyError):
        Reranker(demo_store[0]).rank("x", ["nope"])
    with pytest.raises(StoreError):
        Reranker(demo_store[0], checkpoint=tmp_path / "other")


def rows_by_pair(path):
    return {(r["query_id"], r["image_id"]): r for r in pq.read_table(path).to_pylist()}


@pytest.mark.slow
def test_multi_processing_scores_equal_in_process(scored, demo_store, queries, tmp_path):
    out = tmp_path / "mp.parquet"
    run_rerank(queries[0], demo_store[0], out, "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    a, b = rows_by_pair(scored[0]), rows_by_pair(out)
    assert set(a) == set(b)
    assert all(abs(a[k]["score"] - b[k]["score"]) <= 1e-5 and a[k]["rank"] == b[k]["rank"] for k in a)


class _RecordingHandler(JointScorerHandler):
    """The real handler (default checkpoint, batches of 4), also keeping each batch's texts."""

    def __init__(self):
        super().__init__(None, batch_size=4)
        self.batches = []

    def run_inference(self, batch, model, inference_args=None):
        self.batches.append([text for text, _ in batch])
        return super().run_inference(batch, model, inference_args)


def test_score_shard_scores_full_batches_grouped_by_text(demo_store):
    from transforms.route_requests import Request
    from transforms.score_pairs import _ScoreShard
    store = TokenStore(demo_store[0])
    shard = sorted(store.shards)[0]
    ids, tokens, _ = store.read_rows(shard, list(range(6)))
    texts = ["a much longer query text", "short", "mid text"]
    routed = [(row, Request(f"q{t}", ids[row], texts[t], None)) for row in range(6) for t in range(3)]
    handler = _RecordingHandler()
    fn = _ScoreShard(demo_store[0], handler)
    fn.setup()
    out = list(fn.process((shard, list(reversed(routed)))))
    # 18 pairs in batches of 4: full batches, the last one partial; one text at a time, shortest first
    assert [len(b) for b in handler.batches] == [4, 4, 4, 4, 2]
    flat = [t for b in handler.batches for t in b]
    assert flat == sorted(flat, key=lambda t: (len(t), t))
    assert len(out) == 18 and {(r.query_id, r.image_id) for r, _ in out} == {(r.query_id, r.image_id) for _, r in routed}
    # Each request gets its own pair's score, whatever its batch: the same pair scored alone.
    model = handler.load_model()
    row_of = {i: n for n, i in enumerate(ids)}
    for r, logit in out:
        alone = handler.run_inference([(r.text, tokens[row_of[r.image_id]])], model)[0]
        assert logit == pytest.approx(alone, abs=1e-5)


def test_rerank_scores_do_not_depend_on_batch_size(scored, demo_store, queries, tmp_path):
    out = tmp_path / "b3.parquet"
    run_rerank(queries[0], demo_store[0], out, "--batch_size", "3")
    a, b = rows_by_pair(scored[0]), rows_by_pair(out)
    assert set(a) == set(b)
    assert all(abs(a[k]["score"] - b[k]["score"]) <= 1e-5 for k in a)


def test_write_rows_one_file_from_several_inputs_and_empty(tmp_path):
    import apache_beam as beam
    from schemas.scores import scores_schema
    from transforms.write_output import WriteRows
    rows = [{"query_id": "q", "image_id": f"i{n}", "rank": n + 1, "score": -n, "first_stage_score": None}
            for n in range(3)]
    with beam.Pipeline("DirectRunner") as p:
        a = p | "A" >> beam.Create(rows[:2])
        b = p | "B" >> beam.Create(rows[2:])
        empty = p | "E" >> beam.Create([]) | beam.Filter(lambda r: False)
        _ = (a, b) | "Jsonl" >> WriteRows(str(tmp_path / "both.jsonl"), "jsonl")
        _ = a | "Parquet" >> WriteRows(str(tmp_path / "a.parquet"), "parquet", scores_schema(False))
        _ = empty | "Empty" >> WriteRows(str(tmp_path / "empty.jsonl"), "jsonl")
    got = [json.loads(l) for l in (tmp_path / "both.jsonl").read_text().splitlines()]
    assert sorted(got, key=lambda r: r["rank"]) == rows
    assert sorted(pq.read_table(tmp_path / "a.parquet").to_pylist(), key=lambda r: r["rank"]) == \
        [dict(r, score=float(r["score"])) for r in rows[:2]]
    assert (tmp_path / "empty.jsonl").read_text() == ""
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.parquet", "both.jsonl", "empty.jsonl"]  # no temp left
