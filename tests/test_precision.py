"""--precision bf16 and auto (models/precision.py): what each CPU gets, the refusals, and bf16 through
the jobs on real stores where the CPU has bf16 arithmetic. The ISA caps simulate other CPUs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from models.precision import PrecisionUnavailable, bf16_support, require, resolve
from models.reranker import Reranker
from schemas import manifest as mf
from schemas.reader import TokenStore
from tests.conftest import run_precompute
from tests.test_int8 import spearman
from tests.test_rerank import queries, run_rerank, store_ids  # noqa: F401  (fixture)

needs_bf16 = pytest.mark.skipif(not bf16_support()[0], reason=f"no bf16 arithmetic here: {bf16_support()[1]}")
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def resolved_in(env):
    code = ("import json; from models.precision import resolve, bf16_support; "
            "print(json.dumps([resolve('auto', 'cpu', 'rerank'), bf16_support()]))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_auto_picks_by_what_the_cpu_can_do():
    here, why = resolve("auto")
    assert here == ("bf16" if bf16_support()[0] else "int8")  # the test extra installs ONNX Runtime
    assert why and resolve("int8") == ("int8", "asked for")
    (capped, capped_why), (bf16_ok, bf16_why) = resolved_in(AVX2)
    assert capped == "int8" and not bf16_ok and "int8" in capped_why
    # the refusal names the cap where the CPU has bf16, and the missing flags where it has none
    assert ("ATEN_CPU_CAPABILITY" if bf16_support()[0] else "neither amx_bf16 nor avx512_bf16") in bf16_why
    (old, old_why), _ = resolved_in({"ATEN_CPU_CAPABILITY": "default"})
    assert old == "fp32" and "DEFAULT" in old_why.upper()
    if bf16_support()[0]:  # oneDNN capped below bf16, torch not
        (_, _), (ok, what) = resolved_in({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"})
        assert not ok and "ONEDNN_MAX_CPU_ISA" in what
    with pytest.raises(PrecisionUnavailable, match="GPU only"):
        require("fp16", "cpu", gpu_precisions=("fp32", "bf16", "fp16"))
    with pytest.raises(ValueError, match="precision must be one of"):
        require("fp8")


@pytest.mark.slow
@pytest.mark.parametrize("job", ["rerank", "precompute"])
def test_bf16_is_refused_where_the_cpu_lacks_it(job, tmp_path):
    args = {"rerank": ["--queries", str(tmp_path / "q.jsonl"), "--store", str(tmp_path / "s")],
            "precompute": ["--input", str(tmp_path / "x.tar")]}[job]
    r = subprocess.run([sys.executable, "-m", f"pipeline.{job}", *args, "--output", str(tmp_path / "out"),
                        "--precision", "bf16"], env=dict(os.environ, **AVX2), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "needs a CPU with bf16 arithmetic" in r.stderr and "--precision fp32" in r.stderr
    assert not (tmp_path / "out").exists()


@needs_bf16
def test_bf16_rerank_job_equals_the_api_and_ranks_like_fp32(demo_store, queries, tmp_path):  # noqa: F811
    out = tmp_path / "scores.parquet"
    summary = run_rerank(queries[0], demo_store[0], out, "--precision", "auto")
    assert summary["precision"] == {"precision": "bf16", "asked": "auto", "why": resolve("auto")[1]}
    import pyarrow.parquet as pq
    rows = [r for r in pq.read_table(out).to_pylist() if r["query_id"] != "huge"]
    text = {q["query_id"]: q["text"] for q in queries[1]}
    pairs = [(text[r["query_id"]], r["image_id"]) for r in rows]
    api = Reranker(demo_store[0], precision="auto")
    assert api.precision == "bf16"
    bf16 = api.score(pairs)
    fp32 = Reranker(demo_store[0]).score(pairs)
    assert np.abs(bf16 - [r["score"] for r in rows]).max() <= 1e-3 * np.ptp(fp32)
    assert not np.allclose(fp32, bf16, atol=1e-6)  # bf16 really ran
    assert spearman(bf16, fp32) >= 0.999


@needs_bf16
def test_bf16_precompute_records_auto_and_stores_tokens_close_to_fp32(demo_dir, demo_store, tmp_path):
    store = tmp_path / "store16"
    summary = run_precompute(f"{demo_dir}/{{00000..00002}}.tar", store, "--precision", "auto")
    producer = mf.read(str(store))["producer"]
    assert producer["precision"] == "bf16" == summary["precision"]["precision"]
    assert producer["precision_auto"] == resolve("auto", "cpu", "precompute")[1]
    ids = store_ids(demo_store[0])
    _, t16, e16, _ = TokenStore(str(store)).get(ids)
    _, t32, e32, _ = TokenStore(str(demo_store[0])).get(ids)
    a, b = np.stack(t16).reshape(-1, t16[0].shape[-1]), np.stack(t32).reshape(-1, t32[0].shape[-1])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.999 and cos.min() >= 0.99 and not np.array_equal(a, b)
    assert (np.stack(e16) * np.stack(e32)).sum(1).min() >= 0.999
