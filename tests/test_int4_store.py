"""An int4 token store (--quantization int4): verify, read, rerank, resume, and old int8 stores."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.quantization import INT4, INT8
from models.reranker import Reranker
from schemas import verify as verify_mod
from schemas.reader import StoreError, TokenStore
from tests.conftest import run_precompute
from tests.test_rerank import TEXTS, run_rerank, store_ids


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    n = len(a)
    return 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1))


def test_int4_store_passes_verify_and_declares_its_scheme(demo_store_int4, demo_store):
    store, summary = demo_store_int4
    report = verify_mod.verify(str(store))
    assert report["ok"], report["problems"]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == INT4 and manifest["producer"]["quantization"] == INT4
    m = manifest["model"]
    for s in manifest["shards"]:
        f = pq.ParquetFile(store / s["path"])
        assert f.schema_arrow.metadata[b"edje.quantization"] == INT4.encode()
        assert f.schema_arrow.field("tokens").type.byte_width == (m["num_tokens"] * m["token_dim"] + 1) // 2
        assert f.schema_arrow.field("token_scales").type.byte_width == (m["num_tokens"] + m["token_dim"]) * 2
        assert json.loads((store / "stats" / f"{s['name']}.json").read_text())["quantization"] == INT4
    assert summary["images"] == demo_store[1]["images"]
    assert summary["bytes_per_image"] < demo_store[1]["bytes_per_image"]  # compressed: random weights squeeze


def test_int4_tokens_read_close_to_int8_and_same_embeddings(demo_store_int4, demo_store):
    ids = store_ids(demo_store[0])
    f8, t8, e8, _ = TokenStore(demo_store[0]).get(ids)
    f4, t4, e4, missing = TokenStore(demo_store_int4[0]).get(ids)
    assert f4 == f8 == ids and not missing
    assert t4.dtype == np.float32 and t4.shape == t8.shape
    np.testing.assert_array_equal(e4, e8)  # only tokens change with the scheme
    assert np.linalg.norm(t4 - t8) / np.linalg.norm(t8) < 0.15


def test_rerank_on_int4_store_scores_close_to_int8(demo_store_int4, demo_store, tmp_path):
    ids = store_ids(demo_store[0])
    pairs = [(t, i) for t in TEXTS for i in ids]
    s8 = Reranker(demo_store[0]).score(pairs)
    s4 = Reranker(demo_store_int4[0]).score(pairs)
    assert spearman(s4, s8) >= 0.99
    assert np.abs(s4 - s8).max() < 0.05 * (s8.max() - s8.min())
    # the Beam job decodes the same way as the API
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps({"query_id": f"q{n}", "text": t, "candidates": ids[:10]})
                           for n, t in enumerate(TEXTS[:3])) + "\n")
    summary = run_rerank(q, demo_store_int4[0], tmp_path / "scores.parquet")
    assert summary["pairs"] == 30 and summary["failures"] == 0
    rows = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    api = Reranker(demo_store_int4[0]).score([(TEXTS[int(r["query_id"][1:])], r["image_id"]) for r in rows])
    np.testing.assert_allclose(api, [r["score"] for r in rows], atol=1e-5)


def test_resume_refuses_to_mix_schemes(demo_dir, tmp_path):
    store = tmp_path / "store"
    run_precompute(f"{demo_dir}/00000.tar", store)
    with pytest.raises(SystemExit, match="holds int8_absmax_per_token tokens.*new --output"):
        run_precompute(f"{demo_dir}/{{00000..00001}}.tar", store, "--quantization", "int4")
    (store / "manifest.json").unlink()  # a run killed before its first commit: only the stats records tell
    shutil.rmtree(store / "manifests")
    with pytest.raises(SystemExit, match="holds int8_absmax_per_token shards.*new --output"):
        run_precompute(f"{demo_dir}/{{00000..00001}}.tar", store, "--quantization", "int4")
    assert sorted(p.name for p in (store / "shards").iterdir()) == ["00000.parquet"]
    other = tmp_path / "int4"
    run_precompute(f"{demo_dir}/00000.tar", other, "--quantization", "int4")
    with pytest.raises(SystemExit, match="holds int4_absmax_channel_token tokens"):
        run_precompute(f"{demo_dir}/00000.tar", other)
    with pytest.raises(SystemExit):
        run_precompute(f"{demo_dir}/00000.tar", tmp_path / "x", "--quantization", "int3")


def test_store_from_before_schemes_still_reads_and_resumes_as_int8(demo_dir, tmp_path):
    """Stats records then had no quantization field; manifests already named int8's scheme."""
    store = tmp_path / "store"
    run_precompute(f"{demo_dir}/00000.tar", store)
    stats = store / "stats" / "00000.json"
    rec = json.loads(stats.read_text())
    del rec["quantization"]
    stats.write_text(json.dumps(rec))
    mtime = stats.stat().st_mtime_ns
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["quantization"] == {"scheme": INT8, "dtype": "int8", "granularity": "token",
                                        "scale_dtype": "float32", "embedding_dtype": "float16"}
    ts = TokenStore(store)
    assert ts.scheme.name == INT8 and ts.get(store_ids(store)[:2])[1].shape[0] == 2
    run_precompute(f"{demo_dir}/{{00000..00001}}.tar", store)  # grows; 00000 reused, not redone
    assert stats.stat().st_mtime_ns == mtime
    assert verify_mod.verify(str(store))["ok"]
    with pytest.raises(SystemExit, match="new --output"):
        run_precompute(f"{demo_dir}/00000.tar", store, "--quantization", "int4")


def test_unknown_or_wrong_scheme_is_a_clear_error(demo_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo_store[0], store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["quantization"]["scheme"] = "int3_magic"
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="unknown quantization scheme 'int3_magic'"):
        TokenStore(store)
    report = verify_mod.verify(str(store))
    assert not report["ok"] and "unknown quantization scheme" in report["problems"][0]["problem"]
    # int8 shards under a manifest that says int4: verify and the reader both refuse
    manifest["quantization"]["scheme"] = INT4
    (store / "manifest.json").write_text(json.dumps(manifest))
    problems = [p["problem"] for p in verify_mod.verify(str(store))["problems"]]
    assert any("quantization" in p and "schema" in p for p in problems)
    assert any(f"declares quantization {INT8}, the manifest {INT4}" in p for p in problems)
    with pytest.raises(StoreError, match=f"not {INT4}"):
        TokenStore(store).get(store_ids(demo_store[0])[:1])
