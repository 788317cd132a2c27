"""Rerank: queries with candidates + token store -> joint-encoder scores (Beam).

    python -m pipeline.rerank --queries CANDIDATES.jsonl --store STORE --output SCORES.parquet \\
        [--checkpoint DIR] [--top_k K] [--fusion auto|none|add_first_stage]

Each query is exploded into (query, candidate) requests; requests are routed through the store's
id index to the shard holding the image, only the needed rows are read there and scored in
full batches (same text together), then scores are grouped by query and ranked. Tokens never cross a
shuffle. Output: one row per scored pair (query_id, image_id, rank, score, first_stage_score).
Candidates not in the store, duplicate candidates and malformed queries are written to the
failures file (JSONL), never silently dropped.
"""
import json
import logging
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline._cli import (BeamJobCLI, add_flag, finish, job_main, open_store_for, resolve_precision, run_pipeline,
                           show_progress)
from models.precision import CHOICES
from schemas.scores import scores_schema
from transforms.joint_handler import JointScorerHandler
from transforms.rank_scores import FUSIONS, RankScores, resolve_fusion
from transforms.progress import ProgressBar
from transforms.read_queries import ReadQueries, count_candidates
from transforms.route_requests import RouteRequests
from transforms.score_pairs import ScorePairs
from transforms.write_output import WriteRows, failures_path_for, output_format, remove_stale

log = logging.getLogger(__name__)


class RerankOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add_flag(parser, "--queries", help="query file(s) with candidates: JSONL or Parquet, globs and "
                                              "comma-separated patterns (the retrieve job's output works as is)")
        add_flag(parser, "--store", help="token store directory or URL")
        add_flag(parser, "--output", help="scores file; .jsonl/.json -> JSONL, otherwise Parquet. Exactly "
                                             "this file is written")
        add_flag(parser, "--checkpoint", default=None,
                            help="checkpoint directory; must be the one that built the store (default: embedded)")
        add_flag(parser, "--top_k", type=int, default=0, help="keep the best K per query (0: all)")
        add_flag(parser, "--fusion", default="auto", choices=FUSIONS,
                            help="auto: as the checkpoint says (logit + its learnt fusion_weight * first-stage "
                                 "score when it has one, else the logit); none: rank by the joint encoder's "
                                 "logit alone; add_first_stage: by logit + fusion_weight * first-stage score "
                                 "(the query's candidate_scores, as retrieve writes them)")
        add_flag(parser, "--fusion_weight", type=float, default=None,
                 help="weight of the first-stage score in the fused ranking (default: the checkpoint's, else 1.0)")
        add_flag(parser, "--failures", default=None,
                            help="failure records (JSONL; always written): default <output stem>.failures.jsonl")
        add_flag(parser, "--output_format", default="auto", choices=["auto", "parquet", "jsonl"])
        add_flag(parser, "--batch_size", type=int, default=64, help="pairs per joint-encoder forward")
        add_flag(parser, "--device", default="cpu", help="cpu, cuda or cuda:N")
        add_flag(parser, "--torch_threads", type=int, default=1, help="torch intra-op threads per worker")
        add_flag(parser, "--precision", default="fp32", choices=list(CHOICES),
                 help="joint encoder: fp32; bf16 (torch autocast; on a CPU it needs amx_bf16 or avx512_bf16); "
                      "int8 on the CPU (ONNX Runtime, the edje[int8] extra); auto: the fastest measured on "
                      "this machine (docs/precisions.md)")
        add_flag(parser, "--progress", default="auto", choices=["auto", "on", "off"],
                 help="tqdm progress bar over the pairs scored, with ETA (auto: on for local runners)")


CLI = BeamJobCLI("python -m pipeline.rerank", __doc__, RerankOptions)


def run(argv=None, test_pipeline=None):
    parsed = CLI.parse(argv, required=("queries", "store", "output"))
    if parsed is None:
        return None
    options, opts = parsed
    if opts.top_k < 0 or opts.batch_size < 1 or opts.torch_threads < 1:
        CLI.error("--top_k must be >= 0, --batch_size and --torch_threads >= 1")
    from models.checkpoint import read_config
    joint_cfg = read_config(opts.checkpoint).joint_encoder
    if joint_cfg is None:
        raise SystemExit("error: the checkpoint has no joint encoder")
    precision = resolve_precision(opts.precision, opts.device, "rerank", gpu_precisions=("fp32", "bf16"))
    fusion, fusion_weight = resolve_fusion(opts.fusion, opts.fusion_weight, joint_cfg.fusion_weight)
    store = open_store_for(opts.store, opts.checkpoint)
    started = time.time()
    fmt = output_format(opts.output, opts.output_format)
    failures_path = opts.failures or failures_path_for(opts.output)
    remove_stale(opts.output, failures_path)
    handler = JointScorerHandler(str(opts.checkpoint) if opts.checkpoint else None, opts.device,
                                 opts.torch_threads, opts.batch_size, precision["precision"])

    progress = (ProgressBar(count_candidates(opts.queries), "pair", "rerank")
                if show_progress(opts.progress, options) else None)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    read = pipeline | "ReadQueries" >> ReadQueries(opts.queries, require_candidates=True)
    routed = read["queries"] | "RouteRequests" >> RouteRequests(store.path, store.buckets)
    rows = (routed["routed"]
            | "ScorePairs" >> ScorePairs(store.path, handler, progress and progress.tally())
            | "RankScores" >> RankScores(fusion, fusion_weight, opts.top_k))
    _ = rows | "WriteScores" >> WriteRows(opts.output, fmt, scores_schema(fusion != "none"))
    _ = (read["failures"], routed["failures"]) | "WriteFailures" >> WriteRows(failures_path, "jsonl")
    run_pipeline(pipeline, progress)
    return dict(summarize(opts.output, fmt, failures_path, time.time() - started), precision=precision)


def summarize(output, fmt, failures_path, seconds):
    from schemas import storage
    if fmt == "parquet":
        import pyarrow.parquet as pq
        with storage.open_read(output) as f:
            import pyarrow as pa
            table = pq.read_table(pa.PythonFile(f, mode="r"), columns=["query_id"])
        pairs, queries = table.num_rows, len(set(table.column(0).to_pylist()))
    else:
        ids = [json.loads(line)["query_id"] for line in _read_lines(output)]
        pairs, queries = len(ids), len(set(ids))
    reasons = {}
    for line in _read_lines(failures_path):
        r = json.loads(line)["reason"]
        reasons[r] = reasons.get(r, 0) + 1
    return {"output": output, "queries_scored": queries, "pairs": pairs, "failures": sum(reasons.values()),
            "failure_reasons": reasons, "failures_file": failures_path, "wall_seconds": round(seconds, 2)}


def _read_lines(path):
    from schemas import storage
    with storage.open_read(path) as f:
        for line in f.read().decode("utf-8").splitlines():
            if line.strip():
                yield line


def main(argv=None):
    job_main(run, argv)


if __name__ == "__main__":
    main()
    finish(0)
