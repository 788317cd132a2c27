"""--precision int8 (models/int8.py, ONNX Runtime): rerank and precompute end to end on real
stores, against fp32 and against the Python API, and the refusal where int8 cannot run."""
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.int8 import Int8Unavailable, require_int8
from models.reranker import Reranker
from schemas import manifest as mf
from schemas.reader import TokenStore
from tests.conftest import run_precompute
from tests.test_rerank import queries, rows_by_pair, run_rerank, store_ids  # noqa: F401  (fixture)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def scored_int8(demo_store, queries, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("scores_int8") / "scores.parquet"
    summary = run_rerank(queries[0], demo_store[0], out, "--precision", "int8")
    return out, summary


def test_int8_rerank_job_equals_the_api_and_ranks_like_fp32(scored_int8, demo_store, queries):  # noqa: F811
    out, summary = scored_int8
    rows = [r for r in pq.read_table(out).to_pylist() if r["query_id"] != "huge"]
    text = {q["query_id"]: q["text"] for q in queries[1]}
    pairs = [(text[r["query_id"]], r["image_id"]) for r in rows]
    api8 = Reranker(demo_store[0], precision="int8").score(pairs)
    # A pair's int8 input is the same bytes in every batch (score_batch: no padding, each text alone,
    # one thread), so job and API agree to float noise, not to one quantization step (~1e-2)
    assert np.allclose(api8, [r["score"] for r in rows], atol=1e-4)
    fp32 = Reranker(demo_store[0]).score(pairs)
    assert not np.allclose(fp32, api8, atol=1e-6)  # int8 really ran
    assert spearman(api8, fp32) >= 0.99
    assert np.abs(api8 - fp32).max() < 0.1 * (fp32.max() - fp32.min())
    assert summary["failures"] > 0 and summary["pairs"] == pq.read_table(out).num_rows  # bad rows reported


@pytest.mark.slow
def test_int8_multi_processing_scores_equal_in_process(scored_int8, demo_store, queries, tmp_path):  # noqa: F811
    out = tmp_path / "mp.parquet"
    run_rerank(queries[0], demo_store[0], out, "--precision", "int8",
               "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    a, b = rows_by_pair(scored_int8[0]), rows_by_pair(out)
    assert set(a) == set(b)
    assert all(abs(a[k]["score"] - b[k]["score"]) <= 1e-5 and a[k]["rank"] == b[k]["rank"] for k in a)


def test_int8_precompute_records_its_precision_and_stores_tokens_close_to_fp32(demo_dir, demo_store, tmp_path):
    store = tmp_path / "store8"
    run_precompute(f"{demo_dir}/{{00000..00002}}.tar", store, "--precision", "int8")
    m8, m32 = mf.read(str(store)), mf.read(str(demo_store[0]))
    assert m8["producer"]["precision"] == "int8" and m32["producer"]["precision"] == "fp32"
    ids = store_ids(demo_store[0])
    assert store_ids(store) == ids
    _, t8, e8, _ = TokenStore(str(store)).get(ids)
    _, t32, e32, _ = TokenStore(str(demo_store[0])).get(ids)
    t8, t32 = np.stack(t8).reshape(-1, t8[0].shape[-1]), np.stack(t32).reshape(-1, t32[0].shape[-1])
    cos = (t8 * t32).sum(1) / np.linalg.norm(t8, axis=1) / np.linalg.norm(t32, axis=1)
    assert cos.mean() >= 0.998 and cos.min() >= 0.99
    assert not np.array_equal(t8, t32)
    ecos = (np.stack(e8) * np.stack(e32)).sum(1)
    assert ecos.min() >= 0.99
    # a rerun at the other precision re-encodes every shard instead of reusing int8 ones
    again = run_precompute(f"{demo_dir}/{{00000..00002}}.tar", store)
    assert mf.read(str(store))["producer"]["precision"] == "fp32" and again["images"] == len(ids)
    _, t, _, _ = TokenStore(str(store)).get(ids)
    assert np.array_equal(np.stack(t).reshape(t32.shape), t32)


def test_int8_is_refused_on_a_gpu_device():
    with pytest.raises(Int8Unavailable, match="CPU only"):
        require_int8("cuda")


@pytest.mark.slow
@pytest.mark.parametrize("job", ["rerank", "precompute"])
def test_int8_is_refused_where_the_cpu_lacks_avx2(job, tmp_path):
    """ATEN_CPU_CAPABILITY=default is torch's own switch: its CPU reading then lacks AVX2, as on
    an old x86 CPU, and the check that reads it refuses before any work starts."""
    args = {"rerank": ["--queries", str(tmp_path / "q.jsonl"), "--store", str(tmp_path / "s")],
            "precompute": ["--input", str(tmp_path / "x.tar")]}[job]
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    r = subprocess.run([sys.executable, "-m", f"pipeline.{job}", *args, "--output", str(tmp_path / "out"),
                        "--precision", "int8"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "needs a CPU with AVX2" in r.stderr and "--precision fp32" in r.stderr
    assert not (tmp_path / "out").exists()
