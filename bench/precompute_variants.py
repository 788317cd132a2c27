"""Precompute benchmark: (A) our per-shard DoFn vs (B) Beam's standard RunInference.

    HF_HUB_OFFLINE=1 python -m bench.precompute_variants [--shards 4 --per_shard 64 --repeats 2]

A is the real job, ``pipeline.precompute.run`` (EncodeShardFn: one element per shard, the
ModelHandler called in fixed-size batches cut in shard order), into a fresh store each repeat.

B is built here from the same pieces: shards are flattened into samples by a DoFn that reads and
decodes them (``iter_samples`` + ``decode_image`` + the backbone's ``image_transform()``), the
preprocessed tensors go through ``RunInference(KeyedModelHandler(VisionModelHandler(...)))``
(the keyed wrapper only carries (shard, position, id, caption, metadata) past the model), outputs
are quantized with ``quantize_int8``, grouped back per shard (GroupByKey on the shard name) and
written one Parquet file per shard with ``write_parquet_atomic`` and ``token_schema`` (same
schema metadata as A, so the files can be compared byte for byte). B writes token shards only:
no cross-shard duplicate scan, failure files, stats records, index or manifest (A does all that).

Same checkpoint, batch size and torch threads for both; DirectRunner in-process, then (unless
``--no_mp``) both again with ``--direct_num_workers=2 --direct_running_mode=multi_processing`` in
a child process with a time limit. Prints one JSON line, then a table.
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from models.checkpoint import embedding_dim, fingerprint, load_vision_encoder, read_config
from schemas.quantization import quantize_int8
from pipeline import precompute
from scenes import photos
from schemas import columns as C
from schemas import storage
from schemas.token_store import QUANT_SCHEME, TOKEN_ROW_GROUP_SIZE, token_schema
from transforms.encode_shard import _caption, _metadata
from transforms.image_decode import DEFAULT_MAX_PIXELS, decode_image
from transforms.shard_files import plan_shards
from transforms.tar_samples import DEFAULT_MAX_MEMBER_BYTES, ShardReadError, iter_samples
from transforms.vision_handler import VisionModelHandler

NS = "edje_bench_b"
MP_FLAGS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
SHARD_MARKERS = "shards"


# ----------------------------------------------------------------------------------------------
# Variant B: flatten samples -> RunInference -> GroupByKey(shard) -> one Parquet per shard
# ----------------------------------------------------------------------------------------------

class ReadDecodeFn(beam.DoFn):
    """ShardSpec -> ((shard, seq, image_id, caption, metadata), preprocessed tensor) per usable
    sample in tar order, plus the shard's name on the ``shards`` output (so that a shard whose
    samples all fail still gets its, empty, file)."""

    def __init__(self, checkpoint, max_member_bytes=DEFAULT_MAX_MEMBER_BYTES, max_pixels=DEFAULT_MAX_PIXELS):
        self.checkpoint = checkpoint
        self.max_member_bytes = max_member_bytes
        self.max_pixels = max_pixels
        self.failed = Metrics.counter(NS, "samples_failed")

    def setup(self):
        # B needs the transform before the model handler has loaded anything: a second load.
        self._transform = load_vision_encoder(self.checkpoint)[0].backbone.image_transform()

    def process(self, spec):
        yield beam.pvalue.TaggedOutput(SHARD_MARKERS, spec.name)
        seen, seq = set(), 0
        try:
            with storage.open_read(spec.source) as f:
                for sample in iter_samples(f, read_data=True, max_member_bytes=self.max_member_bytes):
                    ext = sample.image_extension()
                    if sample.key in seen or ext is None:
                        self.failed.inc()
                        continue
                    seen.add(sample.key)
                    try:
                        tensor = self._transform(decode_image(sample.members[ext], self.max_pixels))
                    except Exception:
                        self.failed.inc()
                        continue
                    key = (spec.name, seq, sample.key, _caption(sample.members.get("txt")),
                           _metadata(sample.members.get("json")))
                    seq += 1
                    yield key, tensor
        except (ShardReadError, OSError):
            self.failed.inc()


class ObservedKeyedHandler(KeyedModelHandler):
    """KeyedModelHandler that records, as Beam metrics, how RunInference cut its batches (size,
    batches mixing shards). Observation only: the batch reaches VisionModelHandler unchanged."""

    def run_inference(self, batch, model, inference_args=None):
        batch = list(batch)
        Metrics.distribution(NS, "batch_size").update(len(batch))
        Metrics.counter(NS, "batches").inc()
        if len({k[0] for k, _ in batch}) > 1:
            Metrics.counter(NS, "batches_spanning_shards").inc()
        return super().run_inference(batch, model, inference_args)


def quantize_row(keyed):
    (shard, seq, image_id, caption, meta), out = keyed
    try:
        q, scales = quantize_int8(out.tokens[None])
        if not np.isfinite(out.embedding).all():
            raise ValueError("non-finite values in embedding")
    except ValueError:
        Metrics.counter(NS, "outputs_rejected").inc()
        return
    yield shard, (seq, image_id, q.tobytes(), scales.astype("<f4").tobytes(),
                  out.embedding.astype("<f2").tobytes(), caption, meta)


class WriteShardFn(beam.DoFn):
    """(shard name, [row | None, ...]) -> writes shards/<name>.parquet, rows in tar order."""

    def __init__(self, store, fp, num_tokens, token_dim, emb_dim):
        self.store, self.fp = store, fp
        self.num_tokens, self.token_dim, self.emb_dim = num_tokens, token_dim, emb_dim

    def setup(self):
        # Same schema and metadata as EncodeShardFn, so that equal rows give equal files.
        self._schema = token_schema(self.num_tokens, self.token_dim, self.emb_dim).with_metadata({
            "edje.fingerprint": self.fp, "edje.quantization": QUANT_SCHEME,
            "edje.num_tokens": str(self.num_tokens), "edje.token_dim": str(self.token_dim)})

    def process(self, item):
        name, rows = item
        rows = sorted((r for r in rows if r is not None), key=lambda r: r[0])
        schema = self._schema

        def batches():
            for i in range(0, len(rows), TOKEN_ROW_GROUP_SIZE):
                chunk = [r[1:] for r in rows[i:i + TOKEN_ROW_GROUP_SIZE]]
                yield pa.RecordBatch.from_arrays(
                    [pa.array(col, type=f.type) for col, f in zip(zip(*chunk), schema)], schema=schema)

        info = storage.write_parquet_atomic(storage.join(self.store, f"{C.SHARDS_DIR}/{name}.parquet"),
                                            schema, batches(), TOKEN_ROW_GROUP_SIZE)
        yield dict(info, name=name, rows=len(rows))


def run_variant_b(pattern, store, checkpoint=None, batch_size=32, torch_threads=1, extra_flags=()):
    """Builds and runs B; returns Beam metrics about its batching."""
    cfg = read_config(checkpoint)
    fp = fingerprint(checkpoint)
    specs = plan_shards(pattern).shards
    handler = ObservedKeyedHandler(VisionModelHandler(checkpoint, "cpu", "fp32", torch_threads, batch_size))
    p = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner", *extra_flags]))
    read = (p
            | "Shards" >> beam.Create(specs)
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadDecode" >> beam.ParDo(ReadDecodeFn(checkpoint)).with_outputs(SHARD_MARKERS, main="samples"))
    rows = (read.samples
            | "RunInference" >> RunInference(handler)
            | "Quantize" >> beam.FlatMap(quantize_row))
    markers = read[SHARD_MARKERS] | "Marker" >> beam.Map(lambda name: (name, None))
    _ = ((rows, markers)
         | "Flatten" >> beam.Flatten()
         | "GroupByShard" >> beam.GroupByKey()
         | "WriteShards" >> beam.ParDo(WriteShardFn(store, fp, cfg.adapter.num_tokens, cfg.adapter.output_dim,
                                                    embedding_dim(cfg.backbone))))
    result = p.run()
    result.wait_until_finish()
    return _batch_metrics(result)


def _batch_metrics(result):
    out = {"batches": 0, "batches_spanning_shards": 0}
    try:
        m = result.metrics().query(MetricsFilter().with_namespace(NS))
    except Exception as e:  # some runners do not report metrics
        return {"error": f"{type(e).__name__}: {e}"}
    for c in m["counters"]:
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (c.committed if c.committed is not None
                                                                   else c.attempted)
    for d in m["distributions"]:
        v = d.committed if d.committed is not None else d.attempted
        if v is not None and v.count:
            out["batch_size_min"], out["batch_size_max"] = v.min, v.max
    return out


def run_variant_a(pattern, store, checkpoint=None, batch_size=32, torch_threads=1, extra_flags=()):
    argv = ["--input", pattern, "--output", store, "--runner=DirectRunner", "--progress=off",
            f"--batch_size={batch_size}", f"--torch_threads={torch_threads}", *extra_flags]
    if checkpoint:
        argv += ["--checkpoint", checkpoint]
    return precompute.run(argv)


def timed(variant, pattern, store, args, extra_flags=()):
    fn = run_variant_a if variant == "A" else run_variant_b
    t0 = time.perf_counter()
    info = fn(pattern, store, args.checkpoint, args.batch_size, args.torch_threads, extra_flags)
    seconds = time.perf_counter() - t0
    rec = {"variant": variant, "seconds": round(seconds, 3), "store": store}
    if variant == "B":
        rec["batching"] = info
    return rec


# ----------------------------------------------------------------------------------------------
# Reading stores back
# ----------------------------------------------------------------------------------------------

def shard_hashes(store):
    out = {}
    for path in sorted(glob.glob(os.path.join(store, C.SHARDS_DIR, "*.parquet"))):
        with open(path, "rb") as f:
            out[os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def store_rows(store):
    """image_id -> (tokens, token_scales, embedding) bytes, over all shards of a store."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(store, C.SHARDS_DIR, "*.parquet"))):
        t = pq.read_table(path, columns=[C.IMAGE_ID, C.TOKENS, C.TOKEN_SCALES, C.EMBEDDING]).to_pydict()
        for i, image_id in enumerate(t[C.IMAGE_ID]):
            rows[image_id] = (t[C.TOKENS][i], t[C.TOKEN_SCALES][i], t[C.EMBEDDING][i])
    return rows


def compare_rows(ref_store, other_store):
    a, b = store_rows(ref_store), store_rows(other_store)
    common = sorted(set(a) & set(b))
    return {
        "ids_ref": len(a), "ids_other": len(b), "ids_common": len(common),
        "tokens_equal": sum(a[k][0] == b[k][0] for k in common),
        "scales_equal": sum(a[k][1] == b[k][1] for k in common),
        "embedding_equal": sum(a[k][2] == b[k][2] for k in common),
        "all_equal": len(a) == len(b) == len(common) and all(a[k] == b[k] for k in common),
    }


def same_files(h1, h2):
    return bool(h1) and h1 == h2


def batch_invariance_probe(pattern, args):
    """Does one image's output depend on what else is in its batch (on this machine)? Compares a
    full batch against each image alone, the batch shifted by 3 and a shorter batch, in float32 and
    as stored (int8 tokens, float16 embedding). Tells whether B's bundle-dependent batch cuts can
    change the stored bytes."""
    handler = VisionModelHandler(args.checkpoint, "cpu", "fp32", args.torch_threads, args.batch_size)
    model = handler.load_model()
    transform = model.backbone.image_transform()
    spec = plan_shards(pattern).shards[0]
    images = []
    with storage.open_read(spec.source) as f:
        for s in iter_samples(f):
            images.append(transform(decode_image(s.members[s.image_extension()])))
            if len(images) == args.batch_size + 3:
                break
    n = min(args.batch_size, len(images) - 3)
    if n < 4:
        return None
    ref = handler.run_inference(images[:n], model)
    others = {"batch_of_1": [handler.run_inference([im], model)[0] for im in images[:n]],
              "shifted_by_3": [None] * 3 + list(handler.run_inference(images[3:n + 3], model))[:n - 3],
              "first_half": list(handler.run_inference(images[:n // 2 + 1], model))}

    def stored(o):
        q, scales = quantize_int8(o.tokens[None])
        return q.tobytes(), scales.astype("<f4").tobytes(), o.embedding.astype("<f2").tobytes()

    out = {"images": n}
    for name, outs in others.items():
        pairs = [(r, o) for r, o in zip(ref, outs) if o is not None]
        out[name] = {"float32_equal": all(np.array_equal(r.tokens, o.tokens) and np.array_equal(r.embedding, o.embedding)
                                          for r, o in pairs),
                     "stored_bytes_equal": all(stored(r) == stored(o) for r, o in pairs)}
    return out


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------

def run_series(pattern, root, tag, args, extra_flags=(), emit=None):
    """Alternates A and B (A,B then B,A ...) into fresh stores; returns the run records."""
    runs = []
    for r in range(args.repeats):
        for variant in (("A", "B") if r % 2 == 0 else ("B", "A")):
            store = os.path.join(root, f"{tag}-{variant}{r}")
            rec = timed(variant, pattern, store, args, extra_flags)
            rec["repeat"] = r
            runs.append(rec)
            if emit:
                emit(rec)
    return runs


def mp_child(spec_json):
    """Runs the multi-processing series in this (child) process, one JSON line per run."""
    spec = json.loads(spec_json)
    args = argparse.Namespace(**spec["args"])

    def emit(rec):
        print("MPRUN " + json.dumps(rec), flush=True)

    run_series(spec["pattern"], spec["root"], "mp", args, MP_FLAGS, emit)


def run_mp(pattern, root, args):
    spec = {"pattern": pattern, "root": root,
            "args": {k: getattr(args, k) for k in ("checkpoint", "batch_size", "torch_threads", "repeats")}}
    cmd = [sys.executable, "-m", "bench.precompute_variants", "--_mp_child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    note = None
    try:
        out, err = proc.communicate(timeout=args.mp_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (it and its Beam workers)
        out, err = proc.communicate()
        note = f"stopped after {args.mp_timeout}s; runs finished before that are kept"
    runs = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("MPRUN ")]
    if proc.returncode not in (0, None) and note is None:
        note = f"child exited {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"
    return runs, note


def summarize(runs, images):
    out = {}
    for v in ("A", "B"):
        secs = [r["seconds"] for r in runs if r["variant"] == v]
        if secs:
            out[v] = {"seconds": secs, "best_s": min(secs),
                      "images_per_s_best": round(images / min(secs), 1),
                      "images_per_s_mean": round(images / (sum(secs) / len(secs)), 1)}
    if "A" in out and "B" in out:
        out["ratio_B_over_A"] = round(out["B"]["images_per_s_best"] / out["A"]["images_per_s_best"], 3)
    return out


def determinism(runs, ref_a_store):
    """File hashes across repeats of each variant, and row bytes of each run against A's first run."""
    out = {}
    ref_hashes = shard_hashes(ref_a_store)
    for v in ("A", "B"):
        stores = [r["store"] for r in runs if r["variant"] == v]
        hashes = [shard_hashes(s) for s in stores]
        out[v] = {
            "runs": len(stores),
            "shard_files_identical_across_runs": all(same_files(hashes[0], h) for h in hashes[1:])
            if len(hashes) > 1 else None,
            "shard_files_identical_to_A_inprocess": all(same_files(ref_hashes, h) for h in hashes),
            "rows_vs_A_inprocess": compare_rows(ref_a_store, stores[0]) if stores else None,
        }
    return out


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(result):
    lines = [f"{'mode':<16} {'variant':<34} {'seconds per run':<22} {'img/s best':>10} {'img/s mean':>10}"]
    names = {"A": "A per-shard DoFn (pipeline.precompute)", "B": "B RunInference + GroupByKey"}
    for mode in ("in_process", "multi_processing"):
        s = result["timings"].get(mode)
        if not s or "A" not in s and "B" not in s:
            continue
        for v in ("A", "B"):
            if v in s:
                lines.append(f"{mode:<16} {names[v][:34]:<34} {', '.join(f'{x:.2f}' for x in s[v]['seconds']):<22} "
                             f"{s[v]['images_per_s_best']:>10} {s[v]['images_per_s_mean']:>10}")
        if "ratio_B_over_A" in s:
            lines.append(f"{mode:<16} {'ratio B/A (best)':<34} {'':<22} {s['ratio_B_over_A']:>10}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.precompute_variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per_shard", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--torch_threads", type=int, default=1)
    ap.add_argument("--checkpoint", default=None, help="default: the embedded demo checkpoint")
    ap.add_argument("--no_mp", action="store_true", help="skip the multi_processing measurements")
    ap.add_argument("--mp_timeout", type=int, default=240, help="seconds allowed for all multi_processing runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--_mp_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._mp_child:
        return mp_child(args._mp_child)
    if args.shards < 1 or args.per_shard < 1 or args.repeats < 1:
        ap.error("--shards, --per_shard and --repeats must be >= 1")

    started = time.time()
    root = tempfile.mkdtemp(prefix="edje-bench-")
    try:
        shards_dir = os.path.join(root, "input")
        os.makedirs(shards_dir)
        for s in range(args.shards):
            photos.write_shard(os.path.join(shards_dir, f"{s:05d}.tar"), photos.demo_samples(s, args.per_shard))
        pattern = os.path.join(shards_dir, "{%05d..%05d}.tar" % (0, args.shards - 1))
        images = args.shards * args.per_shard

        # Untimed warm-up (first Beam pipeline of the process pays one-off costs), one shard.
        run_variant_a(os.path.join(shards_dir, "00000.tar"), os.path.join(root, "warmup"), args.checkpoint,
                      args.batch_size, args.torch_threads)

        runs = run_series(pattern, root, "inproc", args)
        ref_a = next(r["store"] for r in runs if r["variant"] == "A")
        counted = len(store_rows(ref_a))
        result = {"bench": "precompute_variants", "date": datetime.date.today().isoformat(),
                  "cpu": cpu_model(), "cores": os.cpu_count(),
                  "shards": args.shards, "per_shard": args.per_shard, "images": images,
                  "images_stored_by_A": counted, "repeats": args.repeats, "batch_size": args.batch_size,
                  "torch_threads": args.torch_threads, "checkpoint": args.checkpoint or "embedded default",
                  "timings": {"in_process": summarize(runs, counted)},
                  "determinism": {"in_process": determinism(runs, ref_a)},
                  "B_batching": {"in_process": [r["batching"] for r in runs if r["variant"] == "B"]},
                  "model_batch_invariant_here": batch_invariance_probe(pattern, args)}

        if args.no_mp:
            result["timings"]["multi_processing"] = {"skipped": "--no_mp"}
        else:
            mp_runs, note = run_mp(pattern, root, args)
            result["timings"]["multi_processing"] = summarize(mp_runs, counted)
            if note:
                result["timings"]["multi_processing"]["note"] = note
            if mp_runs:
                result["determinism"]["multi_processing"] = determinism(mp_runs, ref_a)
                result["B_batching"]["multi_processing"] = [r.get("batching") for r in mp_runs
                                                           if r["variant"] == "B"]
        result["bench_wall_s"] = round(time.time() - started, 1)
        print(json.dumps(result))
        print()
        print(table(result))
        return result
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
