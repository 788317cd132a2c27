"""First-stage retrieval: exact cosine top-k against a brute-force numpy reference."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.checkpoint import load_vision_encoder
from pipeline import retrieve
from schemas import columns as C
from schemas import manifest as mf
from schemas import queries as Q
from transforms.topk_search import TopKCombineFn, shard_topk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM = ["--runner=DirectRunner"]
TEXTS = ["a dog running on the grass", "a red car parked in the street", "a bowl of fruit",
         "mountains under a cloudy sky", "two people walking on a beach", "a cat", "an old building"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


def store_embeddings(store):
    """All (ids, float32 embeddings) of the store, straight from the shard files."""
    manifest = mf.read(str(store))
    dim = manifest["model"]["embedding_dim"]
    ids, embs = [], []
    for s in manifest["shards"]:
        table = pq.read_table(store / s["path"], columns=[C.IMAGE_ID, C.EMBEDDING])
        ids += table.column(C.IMAGE_ID).to_pylist()
        raw = b"".join(table.column(C.EMBEDDING).to_pylist())
        embs.append(np.frombuffer(raw, "<f2").reshape(-1, dim).astype(np.float32))
    return ids, np.concatenate(embs)


def brute_force(texts, store, k):
    encoder, _, _ = load_vision_encoder(None)
    with torch.inference_mode():
        q = encoder.backbone.encode_text(encoder.backbone.tokenizer()(texts)).numpy()
    ids, emb = store_embeddings(store)
    scores = (q.astype(np.float64) @ emb.astype(np.float64).T)
    out = []
    for row in scores:
        order = sorted(range(len(ids)), key=lambda j: (-row[j], ids[j]))[:k]
        out.append(([ids[j] for j in order], [float(row[j]) for j in order]))
    return out


def assert_same_ranking(got_ids, got_scores, want_ids, want_scores):
    assert len(got_ids) == len(want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    for i, (g, w) in enumerate(zip(got_ids, want_ids)):
        # Equal ids, except where two reference scores are closer than float noise (either order).
        near = {j for j, s in zip(want_ids, want_scores) if abs(s - want_scores[i]) < 1e-6}
        assert g == w or g in near, (i, got_ids, want_ids)


@pytest.fixture(scope="module")
def retrieved(demo_store, tmp_path_factory):
    """One run over a JSONL file (with bad lines) and a Parquet file, in small blocks."""
    store = demo_store[0]
    d = tmp_path_factory.mktemp("retrieve")
    write_jsonl(d / "a.jsonl", [
        {"query_id": "q0", "text": TEXTS[0], "relevant": ["000000001"], "anything": {"x": [1, 2]}},
        {"query_id": 1, "text": TEXTS[1], "candidates": ["stale"], "candidate_scores": [0.5]},
        "{not json",
        {"query_id": "q2", "text": "   "},
        "",
        {"query_id": "q3", "text": TEXTS[3], "relevant": []},
        {"query_id": "q0", "text": "same id again"},
    ])
    pq.write_table(pa.table({"query_id": ["p0", "p1", "p2"], "text": [TEXTS[4], None, TEXTS[5]],
                             "relevant": [["000010002"], [], None]}), d / "b.parquet")
    out = d / "out" / "candidates.jsonl"
    summary = retrieve.run([*BEAM, "--queries", f"{d}/*.jsonl,{d}/*.parquet", "--store", str(store),
                            "--top_k", "5", "--output", str(out), "--block_rows", "3", "--query_block", "2",
                            "--batch_size", "2"])
    return store, d, out, summary


def test_matches_brute_force_numpy(retrieved):
    store, _, out, _ = retrieved
    got = {r["query_id"]: r for r in read_jsonl(out)}
    texts = {"q0": TEXTS[0], "1": TEXTS[1], "q3": TEXTS[3], "p0": TEXTS[4], "p2": TEXTS[5]}
    assert set(got) == set(texts)
    want = brute_force(list(texts.values()), store, 5)
    for qid, (ids, scores) in zip(texts, want):
        assert_same_ranking(got[qid]["candidates"], got[qid]["candidate_scores"], ids, scores)


def test_exactly_top_k_sorted_and_from_every_shard(retrieved):
    _, _, out, summary = retrieved
    rows = read_jsonl(out)
    assert summary["queries"] == len(rows) == 5 and summary["output"] == str(out)
    assert summary["failures"] == 4
    shards = set()
    for r in rows:
        assert len(r["candidates"]) == len(set(r["candidates"])) == 5
        assert r["candidate_scores"] == sorted(r["candidate_scores"], reverse=True)
        shards |= {c[:5] for c in r["candidates"]}  # demo ids: shard number, then the sample
    assert len(shards) >= 2


def test_fields_pass_through_and_stale_candidates_are_replaced(retrieved):
    _, _, out, _ = retrieved
    got = {r["query_id"]: r for r in read_jsonl(out)}
    assert got["q0"]["relevant"] == ["000000001"] and got["q0"]["anything"] == {"x": [1, 2]}
    assert got["q0"]["text"] == TEXTS[0] and got["q3"]["relevant"] == []
    assert got["p0"]["relevant"] == ["000010002"]
    assert "stale" not in got["1"]["candidates"] and len(got["1"]["candidate_scores"]) == 5


def test_malformed_queries_go_to_the_failures_file(retrieved):
    _, d, out, summary = retrieved
    assert summary["failures_file"] == str(d / "out" / "candidates.failures.jsonl")
    fails = {(f["source"], f["reason"]) for f in read_jsonl(summary["failures_file"])}
    assert fails == {(f"{d}/a.jsonl:3", Q.BAD_JSON), (f"{d}/a.jsonl:4", Q.BAD_TEXT),
                     (f"{d}/a.jsonl:7", Q.DUPLICATE_QUERY), (f"{d}/b.parquet:2", Q.BAD_TEXT)}


def test_ties_break_by_image_id_across_blocks_and_shards():
    emb = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0.6, 0.8]], np.float32)
    ids = ["e", "b", "z", "a", "c"]
    queries = np.array([[1, 0]], np.float32)
    want = [(1.0, "a"), (1.0, "b"), (1.0, "e")]
    assert shard_topk([(ids[:2], emb[:2]), (ids[2:], emb[2:])], queries, 3, 1)[0] == want
    # Two "shards", merged by the combiner.
    a = shard_topk([(ids[:3], emb[:3])], queries, 2)[0]
    b = shard_topk([(ids[3:], emb[3:])], queries, 2)[0]
    fn = TopKCombineFn(3)
    acc = fn.merge_accumulators([fn.add_input(fn.create_accumulator(), h) for h in (b, a)])
    assert fn.extract_output(acc) == want


def test_a_store_of_another_checkpoint_is_refused(demo_store, tmp_path):
    other = tmp_path / "ckpt"
    other.mkdir()
    with open(os.path.join(ROOT, "models", "default", "config.json")) as f:
        cfg = json.load(f)
    cfg["description"] = "another model"
    (other / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(ROOT, "models", "default", "model.safetensors"), other / "model.safetensors")
    q = tmp_path / "q.jsonl"
    write_jsonl(q, [{"query_id": "a", "text": "x"}])
    with pytest.raises(SystemExit, match="checkpoint"):
        retrieve.run([*BEAM, "--queries", str(q), "--store", str(demo_store[0]), "--output",
                      str(tmp_path / "o.jsonl"), "--checkpoint", str(other)])
    assert not (tmp_path / "o.jsonl").exists()


def test_help_documents_every_flag(capsys):
    assert retrieve.run(["--help"]) is None
    text = capsys.readouterr().out
    for flag in ("--queries", "--store", "--top_k", "--output", "--failures", "--checkpoint",
                 "--batch_size", "--device", "--torch_threads", "--block_rows", "--query_block", "--runner"):
        assert flag in text


@pytest.mark.slow
def test_command_line_store_smaller_than_top_k(demo_store, tmp_path):
    """As a user runs it: JSON summary on stdout; top_k above the store's rows gives every row;
    the failures file exists even when empty."""
    q = tmp_path / "q.jsonl"
    write_jsonl(q, [{"query_id": "a", "text": TEXTS[2]}, {"query_id": "b", "text": TEXTS[6]}])
    out = tmp_path / "c.jsonl"
    r = subprocess.run([sys.executable, "-m", "pipeline.retrieve", *BEAM, "--queries", str(q),
                        "--store", str(demo_store[0]), "--top_k", "30", "--output", str(out),
                        "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["queries"] == 2 and summary["failures"] == 0 and summary["output"] == str(out)
    assert (tmp_path / "c.failures.jsonl").read_text() == ""
    rows = read_jsonl(out)
    want = dict(zip(["a", "b"], brute_force([TEXTS[2], TEXTS[6]], demo_store[0], 30)))
    for row in rows:
        assert len(row["candidates"]) == 24  # every row of the 3-shard store
        assert_same_ranking(row["candidates"], row["candidate_scores"], *want[row["query_id"]])


def test_a_query_embeds_the_same_in_any_batch():
    """The text tower's kernels block by row count; a text's embedding must not depend on how many
    others share its batch (runners bundle differently: Flink's bundles are not the DirectRunner's)."""
    from models.text_encoder import load_text_encoder
    torch.set_num_threads(1)
    encoder, _ = load_text_encoder(None)
    texts = [f"a {c} {s} to the left of a {d} {t}" for c, d in (("red", "blue"), ("white", "green"))
             for s in ("circle", "square", "star") for t in ("diamond", "cross")]
    full = encoder.encode(texts)
    for n in (1, 2, 3, 5, 9):
        for start in range(0, len(texts) - n + 1, n):
            assert np.array_equal(encoder.encode(texts[start:start + n]), full[start:start + n]), (n, start)
