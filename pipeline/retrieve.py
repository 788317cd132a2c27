"""Retrieve: query texts -> exact cosine top-k candidates from a store's embeddings (Beam).

    python -m pipeline.retrieve --runner=DirectRunner \\
        --queries queries.jsonl --store STORE --top_k 20 --output candidates.jsonl \\
        [--checkpoint DIR] [--failures FAILURES.jsonl] [--batch_size N] [--device cpu|cuda]

Each query text is encoded by the checkpoint's backbone text tower; every store shard is scored
against all queries in blocks (memory bounded by the blocks, not by the store) and the per-shard
top-k lists are merged per query. The output is the query file format: each input record with
all its fields, ``candidates`` (min(top_k, store rows) image ids, best first) and
``candidate_scores`` (cosine similarities, descending; ties: image_id ascending) set, ready for
``pipeline.rerank``. Malformed queries go to the failures file (``file:line``), always written.
"""
import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline._cli import (BeamJobCLI, add_flag, beam_counters, finish, job_main, open_store_for, run_pipeline,
                           show_progress)
from schemas import queries as Q
from schemas import storage
from transforms.progress import ProgressBar
from transforms.read_queries import ReadQueries, plan_query_files
from transforms.text_handler import TextModelHandler
from transforms.topk_search import DEFAULT_BLOCK_ROWS, DEFAULT_QUERY_BLOCK, NAMESPACE, SearchTopK
from transforms.write_output import WriteRows, failures_path_for, remove_stale

log = logging.getLogger(__name__)


class RetrieveOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add_flag(parser, "--queries", help="query files: JSONL or Parquet (query_id, text; other fields "
                 "pass through); globs, several patterns separated by commas")
        add_flag(parser, "--store", help="token store directory (local path or gs://, s3://, ... URL)")
        add_flag(parser, "--top_k", type=int, default=20,
                 help="candidates per query; a store with fewer rows gives all of its rows")
        add_flag(parser, "--output", help="output JSONL file (exactly this file): the query records "
                 "with candidates and candidate_scores set")
        add_flag(parser, "--failures", default=None,
                 help="failure records, JSONL; default: <output without extension>.failures.jsonl "
                      "(always written, possibly empty)")
        add_flag(parser, "--checkpoint", default=None,
                 help="checkpoint directory (config.json + model.safetensors); default: the embedded "
                      "demo checkpoint. Must be the checkpoint the store was built with")
        add_flag(parser, "--batch_size", type=int, default=64, help="query texts per text-encoder forward pass")
        add_flag(parser, "--device", default="cpu", help="cpu, cuda or cuda:N (text encoder)")
        add_flag(parser, "--torch_threads", type=int, default=1,
                 help="torch intra-op threads per worker; fixed so that results do not depend on the "
                      "machine (parallelism comes from Beam workers)")
        add_flag(parser, "--block_rows", type=int, default=DEFAULT_BLOCK_ROWS,
                 help="store rows read and scored at a time")
        add_flag(parser, "--progress", default="auto", choices=["auto", "on", "off"],
                 help="tqdm progress bar over the store rows searched, with ETA (auto: on for local runners)")
        add_flag(parser, "--query_block", type=int, default=DEFAULT_QUERY_BLOCK,
                 help="queries per score block; a worker holds one query_block x block_rows float32 "
                      "score block")


def float32_repr(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (scores are float32)."""
    return float(str(np.float32(x)))


def attach_candidates(element):
    """(query_id, {"query": [record], "hits": [[(score, image_id)]]}) -> the output record."""
    _, grouped = element
    hits = grouped["hits"][0] if grouped["hits"] else []
    out = dict(grouped["query"][0])
    out[Q.CANDIDATES] = [image_id for _, image_id in hits]
    out[Q.CANDIDATE_SCORES] = [float32_repr(score) for score, _ in hits]
    return out


class _Count(beam.DoFn):
    def __init__(self, name):
        self.name = name
        self.counter = Metrics.counter(NAMESPACE, name)

    def process(self, element):
        self.counter.inc()
        yield element


CLI = BeamJobCLI("python -m pipeline.retrieve", __doc__, RetrieveOptions)


def run(argv=None, test_pipeline=None):
    parsed = CLI.parse(argv, required=("queries", "store", "output"))
    if parsed is None:
        return None
    options, opts = parsed
    if min(opts.top_k, opts.batch_size, opts.torch_threads, opts.block_rows, opts.query_block) < 1:
        CLI.error("--top_k, --batch_size, --torch_threads, --block_rows and --query_block must be >= 1")
    failures_path = opts.failures or failures_path_for(opts.output)
    if failures_path == opts.output:
        CLI.error("--failures must differ from --output")
    started = time.time()
    store = opts.store.rstrip("/")
    opened = open_store_for(store, opts.checkpoint)
    if not plan_query_files(opts.queries):
        raise SystemExit(f"error: no query files match {opts.queries!r}")
    remove_stale(opts.output, failures_path)

    handler = KeyedModelHandler(TextModelHandler(
        str(opts.checkpoint) if opts.checkpoint else None, device=opts.device,
        torch_threads=opts.torch_threads, batch_size=opts.batch_size))
    progress = ProgressBar(len(opened), "row", "retrieve") if show_progress(opts.progress, options) else None
    pipeline = test_pipeline or beam.Pipeline(options=options)
    read = pipeline | "ReadQueries" >> ReadQueries(opts.queries, require_candidates=False)
    hits = (read["queries"]
            | "QueryTexts" >> beam.Map(lambda q: (q[Q.QUERY_ID], q[Q.TEXT]))
            | "EncodeQueries" >> RunInference(handler)
            | "SearchTopK" >> SearchTopK(store, opts.top_k, opts.block_rows, opts.query_block,
                                         progress and progress.tally()))
    _ = ({"query": read["queries"] | "KeyQueries" >> beam.Map(lambda q: (q[Q.QUERY_ID], q)), "hits": hits}
         | "JoinHits" >> beam.CoGroupByKey()
         | "AttachCandidates" >> beam.Map(attach_candidates)
         | "CountQueries" >> beam.ParDo(_Count("queries"))
         | "WriteCandidates" >> WriteRows(opts.output, "jsonl"))
    _ = (read["failures"]
         | "CountFailures" >> beam.ParDo(_Count("failures"))
         | "WriteFailures" >> WriteRows(failures_path, "jsonl"))

    result = run_pipeline(pipeline, progress)
    counts = beam_counters(result, NAMESPACE) or {"queries": _count_lines(opts.output), "failures": _count_lines(failures_path)}
    return {"queries": counts.get("queries", 0), "failures": counts.get("failures", 0),
            "output": opts.output, "failures_file": failures_path, "store": store,
            "store_rows": len(opened), "top_k": opts.top_k, "wall_seconds": round(time.time() - started, 2)}


def _count_lines(path: str) -> int:
    with storage.open_read(path) as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def main(argv=None):
    job_main(run, argv)


if __name__ == "__main__":
    main()
    finish(0)
