"""One score per pair: the rerank job and the Python API give a (text, image) pair the same score at
every batch size, thread count and mix of other pairs, at each precision, on each instruction set the
suite can reach on this machine.

The caps are the libraries' own switches: ATEN_CPU_CAPABILITY (torch's vectorised kernels),
MKL_ENABLE_INSTRUCTIONS (torch's fp32 GEMMs), ONEDNN_MAX_CPU_ISA (its bf16 and int8 kernels). They
only cap: a CPU without AVX-512 skips that leg (torch takes ATEN_CPU_CAPABILITY=avx512 at its word, and
would crash there). ONNX Runtime (int8) has no such switch: it always runs the CPU's best kernels."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from models.precision import bf16_support, cpu_flags, int8_support
from tests.test_rerank import TEXTS, store_ids

CAPS = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "no-simd": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
PRECISIONS = ["fp32", "bf16", "int8"]
# what each cap must refuse: int8 needs AVX2, bf16 AVX-512 bf16 or AMX (models.precision)
REFUSED = {"native": set(), "avx512": set(), "avx2": {"bf16"}, "no-simd": {"bf16", "int8"}}
# fp32: float noise only. int8: its float inputs are the same bytes in every batch and its GEMMs are
# integer, so only the float tail can differ; a pair whose input moved by 1e-6 would move by ~1e-2
# (one activation across a quantization step). bf16: a thousandth of the score range (measured: 0)
TOLERANCE = {"fp32": 1e-5, "int8": 1e-4, "bf16": 1e-3}


@pytest.fixture(scope="module")
def pair_queries(demo_store, tmp_path_factory):
    """Texts of different token lengths, each over an overlapping half of the store, so that batches
    mix texts and lengths differently in the job and in the API."""
    ids = store_ids(demo_store[0])
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("pair_queries") / "q.jsonl"
    texts = TEXTS + ["a red circle left of a blue square, above a green triangle near the corner"]
    path.write_text("".join(json.dumps({"query_id": f"q{n}", "text": t,
                                        "candidates": list(rng.choice(ids, len(ids) // 2, replace=False))}) + "\n"
                            for n, t in enumerate(texts)))
    return path, len(texts) * (len(ids) // 2)


@pytest.mark.slow
@pytest.mark.parametrize("cap", list(CAPS))
def test_job_and_api_give_a_pair_one_score(cap, demo_store, pair_queries, tmp_path):
    if cap == "avx512" and "avx512f" not in cpu_flags():
        pytest.skip("this CPU has no AVX-512: the native leg is its best ISA")
    env = dict(os.environ, **CAPS[cap])
    r = subprocess.run([sys.executable, "-m", "tests.pair_scores", str(demo_store[0]), str(pair_queries[0]),
                        str(tmp_path), *PRECISIONS], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "scores.json").read_text())
    refused = set(result["refused"])
    assert REFUSED[cap] <= refused, result["refused"]
    assert "fp32" not in refused
    if cap in ("native", "avx512"):  # refused only where the CPU itself lacks it
        assert ("bf16" in refused) == (not bf16_support()[0]) and ("int8" in refused) == (not int8_support()[0])
    for precision in set(PRECISIONS) - refused:
        runs = result[precision]
        assert len(runs["keys"]) == pair_queries[1]  # every pair scored
        reference = np.array(runs["job"]["64"])
        spread = reference.max() - reference.min()
        assert spread > 1.0
        tolerance = TOLERANCE[precision] * (spread if precision == "bf16" else 1.0)
        for how, scores in [(f"job batch {b}", s) for b, s in runs["job"].items()] + \
                           [(f"api batch {b}", s) for b, s in runs["api"].items()]:
            worst = float(np.abs(np.array(scores) - reference).max())
            assert worst <= tolerance, f"{cap} ({result['capability']}) {precision} {how}: {worst:.3g}"
