"""``python -m tests.pair_scores STORE QUERIES OUT_DIR PRECISION...``: one set of pairs scored by the
rerank job (batch sizes 5 and 64, one thread) and by ``Reranker`` (two threads, the pairs shuffled into
batches of 1, 13 and 64), for each precision this CPU runs (the others are listed as refused); writes OUT_DIR/scores.json. test_pair_scores runs it in
a subprocess under each instruction-set cap, since the caps are read when the libraries load."""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from models.precision import PrecisionUnavailable, require
from models.reranker import Reranker
from pipeline import rerank

JOB_BATCHES = (5, 64)
API_BATCHES = (1, 13, 64)


def job_scores(store, queries, out, precision, batch_size):
    path = Path(out) / f"job-{precision}-{batch_size}.parquet"
    rerank.run(["--queries", str(queries), "--store", str(store), "--output", str(path), "--runner=DirectRunner",
                "--progress=off", "--precision", precision, "--batch_size", str(batch_size), "--torch_threads", "1"])
    return {(r["query_id"], r["image_id"]): r["score"] for r in pq.read_table(path).to_pylist()}


def main(store, queries, out, *precisions):
    text = {}
    for line in Path(queries).read_text().splitlines():
        q = json.loads(line)
        text[q["query_id"]] = q["text"]
    result = {"capability": torch.backends.cpu.get_cpu_capability(), "refused": {}}
    for precision in precisions:
        try:
            require(precision)
        except PrecisionUnavailable as e:  # the CPU (or the cap) lacks it: the test says whether it should
            result["refused"][precision] = str(e)
            continue
        jobs = {b: job_scores(store, queries, out, precision, b) for b in JOB_BATCHES}
        keys = sorted(jobs[JOB_BATCHES[0]])
        torch.set_num_threads(2)
        api = Reranker(str(store), precision=precision)
        order = np.random.default_rng(0).permutation(len(keys))
        runs = {}
        for b in API_BATCHES:
            api.batch_size = b
            shuffled = api.score([(text[keys[k][0]], keys[k][1]) for k in order])
            runs[b] = np.empty(len(keys))
            runs[b][order] = shuffled
        result[precision] = {"keys": keys, "job": {b: [jobs[b][k] for k in keys] for b in JOB_BATCHES},
                             "api": {b: runs[b].tolist() for b in API_BATCHES}}
    (Path(out) / "scores.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
