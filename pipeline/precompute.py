"""Precompute: WebDataset shards -> backbone + adapter -> int8 (or int4) token store (Beam).

    python -m pipeline.precompute --runner=DirectRunner \\
        --input 'shards/{00000..00009}.tar' --output STORE [--checkpoint DIR] \\
        [--batch_size N] [--device cpu|cuda] [--decode pil|torchvision] [--quantization int8|int4]

One token shard per input shard, an id index, then ``manifest.json`` written last. Rerunning
into the same store skips shards already committed with the same checkpoint.
"""
import json
import logging
import sys
import threading
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline._cli import (BeamJobCLI, add_flag, beam_counters, finish, job_main, resolve_precision, run_pipeline,
                           show_progress)
from models.checkpoint import embedding_dim, fingerprint, read_config
from schemas.quantization import CLI_NAMES, UnknownSchemeError, scheme_for_cli
from schemas import columns as C
from schemas import index as idx
from schemas import manifest as mf
from schemas import shard_stats, storage
from schemas.lease import DEFAULT_TTL, LeaseHeld, StoreLease
from schemas.reader import token_column_bytes_per_element
from schemas.token_store import QUANT_SCHEME
from transforms.encode_shard import NAMESPACE as ENCODE_NAMESPACE, EncodeConfig, EncodeShardFn
from transforms.scan_keys import FindCrossShardDuplicates
from transforms.shard_files import PatternError, plan_shards
from transforms.tar_samples import DEFAULT_MAX_MEMBER_BYTES
from transforms.image_decode import DEFAULT_MAX_PIXELS
from transforms.tensor_decode import DECODERS
from transforms.vision_handler import PRECISIONS
from transforms.write_index import WriteIndex
from transforms.write_manifest import WriteManifest

log = logging.getLogger(__name__)


class PrecomputeOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add_flag(parser, "--input", help="input WebDataset shards: a path or URL with braces "
                            "({00000..00099}) and/or globs; several patterns separated by commas. "
                            "img2dataset's side files (.parquet, _stats.json) are ignored")
        add_flag(parser, "--output", help="token store directory (local path or gs://, s3://, ... URL)")
        add_flag(parser, "--checkpoint", default=None,
                            help="checkpoint directory (config.json + model.safetensors); default: the "
                                 "embedded demo checkpoint")
        add_flag(parser, "--batch_size", type=int, default=32,
                            help="images per forward pass; batches are cut in shard order, so the "
                                 "stored bytes depend on it but never on workers or bundling")
        add_flag(parser, "--device", default="cpu", help="cpu, cuda or cuda:N")
        add_flag(parser, "--precision", default="fp32", choices=sorted(PRECISIONS) + ["auto"],
                            help="the forward pass: fp32; bf16 (a bf16 copy of the model on a CPU with amx_bf16 "
                                 "or avx512_bf16, autocast on a GPU); fp16 (GPU, autocast); int8 (CPU, ONNX "
                                 "Runtime, the edje[int8] extra); auto: the fastest measured on this machine. "
                                 "The stored bytes depend on it (docs/precisions.md)")
        add_flag(parser, "--decode", default="pil", choices=list(DECODERS),
                 help="image decoder: pil (PIL + open_clip's transform, one image at a time on the CPU), or "
                      "torchvision (JPEGs decoded in batches with torchvision.io.decode_jpeg on --device, "
                      "nvjpeg on CUDA, and resized/cropped/normalised with torch ops there; other formats "
                      "and JPEGs it refuses fall back to PIL). Part of the stored bytes, like --batch_size")
        add_flag(parser, "--quantization", default="int8",
                 help="token quantization: int8 (int8_absmax_per_token, the default; 24,832 bytes per image "
                      "at 64 x 384) or int4 (int4_absmax_channel_token: 4-bit values, float16 per-channel x "
                      "per-token scales; 13,184 bytes at 64 x 384). A store holds one scheme: "
                      "a different one needs a new --output. Choices: " + ", ".join(CLI_NAMES))
        add_flag(parser, "--torch_threads", type=int, default=1,
                            help="torch intra-op threads per worker; fixed so that results do not "
                                 "depend on the machine (parallelism comes from Beam workers)")
        add_flag(parser, "--max_member_bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                            help="tar members larger than this are not read (recorded as failures)")
        add_flag(parser, "--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                            help="images with more pixels are refused from their header, before decoding")
        add_flag(parser, "--max_failure_rate", type=float, default=0.5,
                 help="failure budget per shard: if more than this fraction of a shard's samples fail "
                      "(duplicates and unreadable shards aside), nothing of it is committed and the job "
                      "exits non-zero naming the worst shards")
        add_flag(parser, "--failure_budget_min_samples", type=int, default=20,
                 help="the budget applies to shards with at least this many samples")
        add_flag(parser, "--index_buckets", type=int, default=0,
                            help="number of id index files; 0 picks one per ~64 shards (power of two)")
        add_flag(parser, "--progress", default="auto", choices=["auto", "on", "off"],
                            help="tqdm progress bar (auto: on for local runners)")
        add_flag(parser, "--lease_seconds", type=float, default=DEFAULT_TTL,
                 help="the store's writer lease (STORE/lease.json) lapses this long after its last renewal "
                      "(renewed every quarter of it): a second job is refused while it is live")


CLI = BeamJobCLI("python -m pipeline.precompute", __doc__, PrecomputeOptions)


def check_store_compatible(store: str, fp: str, names, scheme: str = QUANT_SCHEME) -> None:
    """Refuses to mix models or quantization schemes in one store, or to drop committed shards.

    A different checkpoint or scheme needs a new --output. A rerun may add input shards (the store
    grows) but must list every shard already committed, so the manifest never leaves one behind.
    Stats records without a scheme were written before it could be chosen: int8.
    """
    if storage.exists(mf.manifest_path(store)) or mf.versions(store):
        try:
            manifest = mf.read(store)
        except mf.ManifestError as e:
            raise SystemExit(f"error: {store} has an invalid manifest ({e}); use a new --output") from None
        existing = manifest["model"]["fingerprint"]
        if existing != fp:
            raise SystemExit(f"error: {store} was built with checkpoint {existing[:12]}, this run uses "
                             f"{fp[:12]}; write to a new --output (a store holds one model's tokens)")
        if manifest["quantization"]["scheme"] != scheme:
            raise SystemExit(f"error: {store} holds {manifest['quantization']['scheme']} tokens, this run "
                             f"writes {scheme}; write to a new --output (a store holds one scheme)")
    for path in storage.list_dir(storage.join(store, C.STATS_DIR)):
        if not path.endswith(".json"):
            continue
        rec = shard_stats.read(store, storage.basename(path)[:-5])
        if rec and rec.get("fingerprint") not in (None, fp):
            raise SystemExit(f"error: {store} holds shards of checkpoint {rec['fingerprint'][:12]} "
                             f"({path}), this run uses {fp[:12]}; write to a new --output")
        if rec and rec.get("quantization", QUANT_SCHEME) != scheme:
            raise SystemExit(f"error: {store} holds {rec.get('quantization', QUANT_SCHEME)} shards ({path}), "
                             f"this run writes {scheme}; write to a new --output (a store holds one scheme)")
        if rec and rec.get("status") == shard_stats.STATUS_OK and rec.get("name") not in names:
            raise SystemExit(f"error: {store} already holds shard {rec['name']!r} (from {rec.get('source')}), "
                             f"which --input does not list; rerun with every input of the store "
                             f"(adding new shards is fine) or write to a new --output")


class _Progress:
    """Polls the store's stats records: shards done / total, images/s, ETA (local runs)."""

    def __init__(self, store, names):
        from tqdm import tqdm
        self.store, self.names = store, set(names)
        self.done = {n for n in self.names if storage.exists(shard_stats.path(store, n))}
        self.bar = tqdm(total=len(self.names), initial=len(self.done), unit="shard", desc="precompute",
                        dynamic_ncols=True)
        self.images, self.t0 = 0, time.time()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _poll(self):
        # One listing per poll (not one request per shard): cheap on object stores too.
        present = {storage.basename(p)[:-5] for p in storage.list_dir(storage.join(self.store, C.STATS_DIR))
                   if p.endswith(".json")}
        for name in (present & self.names) - self.done:
            rec = shard_stats.read(self.store, name)
            if rec is not None:
                self.done.add(name)
                self.images += rec.get("rows", 0)
                self.bar.update(1)
        rate = self.images / max(time.time() - self.t0, 1e-6)
        self.bar.set_postfix(images=self.images, img_s=f"{rate:.1f}")

    def _loop(self):
        while not self.stop.wait(0.5):
            self._poll()

    def close(self):
        self.stop.set()
        self.thread.join()
        self._poll()
        self.bar.close()


def run(argv=None, test_pipeline=None):
    parsed = CLI.parse(argv, required=("input", "output"))
    if parsed is None:
        return None
    options, opts = parsed
    if opts.batch_size < 1 or opts.torch_threads < 1 or opts.index_buckets < 0:
        CLI.error("--batch_size and --torch_threads must be >= 1, --index_buckets >= 0")
    if not 0 <= opts.max_failure_rate <= 1:
        CLI.error("--max_failure_rate must be between 0 and 1")
    try:
        scheme = scheme_for_cli(opts.quantization)
    except UnknownSchemeError as e:
        CLI.error(f"--quantization: {e}")
    precision = resolve_precision(opts.precision, opts.device, "precompute", gpu_precisions=("fp32", "bf16", "fp16"))
    started = time.time()
    store = opts.output.rstrip("/")

    cfg = read_config(opts.checkpoint)
    fp = fingerprint(opts.checkpoint)
    try:
        plan = plan_shards(opts.input)
    except PatternError as e:
        raise SystemExit(f"error: --input: {e}") from None
    if not plan.shards:
        raise SystemExit(f"error: no input shards match {opts.input!r}"
                         + (f" ({len(plan.missing)} listed paths do not exist)" if plan.missing else ""))
    try:
        lease = StoreLease(store, job=f"precompute --input {opts.input}", ttl=opts.lease_seconds).acquire()
    except LeaseHeld as e:
        raise SystemExit(f"error: {e}") from None
    try:
        check_store_compatible(store, fp, {s.name for s in plan.shards}, scheme)
        buckets = opts.index_buckets or idx.default_buckets(len(plan.shards))
        model = {"fingerprint": fp, "backbone": cfg.backbone.describe(), "num_tokens": cfg.adapter.num_tokens,
                 "token_dim": cfg.adapter.output_dim, "embedding_dim": embedding_dim(cfg.backbone),
                 "checkpoint": cfg.description}
        encode_cfg = EncodeConfig(
            store=store, checkpoint=str(opts.checkpoint) if opts.checkpoint else None, fingerprint=fp,
            num_tokens=model["num_tokens"], token_dim=model["token_dim"], embedding_dim=model["embedding_dim"],
            batch_size=opts.batch_size, device=opts.device, precision=precision["precision"],
            torch_threads=opts.torch_threads, max_member_bytes=opts.max_member_bytes,
            max_pixels=opts.max_image_pixels, max_failure_rate=opts.max_failure_rate,
            failure_budget_min_samples=opts.failure_budget_min_samples, decode=opts.decode, quantization=scheme)
        producer = {"quantization": scheme, "batch_size": opts.batch_size, "precision": precision["precision"],
                    **({"precision_auto": precision["why"]} if opts.precision == "auto" else {}),
                    "torch_threads": opts.torch_threads, "device": opts.device, "decode": opts.decode}

        # The launcher's plan checks the input, sizes the index and drives the progress bar; the
        # pipeline plans again on a worker so a million shard paths never enter the job graph.
        pattern = opts.input
        pipeline = test_pipeline or beam.Pipeline(options=options)
        specs = (pipeline
                 | "ListShards" >> beam.Create([None])
                 | "PlanShards" >> beam.FlatMap(lambda _: plan_shards(pattern).shards)
                 | "SpreadShards" >> beam.Reshuffle())
        drops = specs | "FindDuplicates" >> FindCrossShardDuplicates(opts.max_member_bytes)
        records = specs | "EncodeShards" >> beam.ParDo(EncodeShardFn(encode_cfg), beam.pvalue.AsMultiMap(drops))
        index_files = records | "WriteIndex" >> WriteIndex(store, buckets)
        _ = pipeline | "WriteManifest" >> WriteManifest(
            records, index_files, store=store, buckets=buckets, model=model,
            inputs=opts.input, missing=plan.missing, producer=producer, quantization=scheme,
            lease_owner=lease.owner)

        show = show_progress(opts.progress, options)
        progress = _Progress(store, [s.name for s in plan.shards]) if show else None
        result = run_pipeline(pipeline, progress)
        manifest = mf.read(store)
        summary = summarize(manifest, store, time.time() - started, plan)
        summary["metrics"] = beam_counters(result, ENCODE_NAMESPACE)
        summary["precision"] = precision
        over = [s for s in manifest["failed_shards"] if s.get("status") == shard_stats.STATUS_OVER_BUDGET]
        if over:
            worst = sorted(over, key=lambda s: -s["bad_samples"] / max(1, s["bad_samples"] + s["rows"]))[:5]
            raise FailureBudgetExceeded(summary, f"error: {len(over)} shard(s) over the failure budget "
                                                 f"(--max_failure_rate {opts.max_failure_rate}); nothing of them was "
                                                 f"committed: " + "; ".join(f"{s['source']}: {s['reason']}" for s in worst))
        return summary
    finally:
        lease.release()


class FailureBudgetExceeded(SystemExit):
    """The job finished, but some shards had too many bad samples. ``summary`` is still set."""

    def __init__(self, summary, message):
        super().__init__(message)
        self.summary = summary


def summarize(manifest, store, seconds, plan):
    t = manifest["totals"]
    token_bytes = sum(s["bytes"] for s in manifest["shards"])
    return {"store": store, "shards": t["shards"], "failed_shards": t["failed_shards"],
            "images": t["rows"], "failures": t["failed"], "duplicates": t["duplicates"],
            "missing_inputs": len(plan.missing), "ignored_side_files": len(plan.ignored),
            "shard_bytes": token_bytes, "bytes_per_image": round(token_bytes / t["rows"], 1) if t["rows"] else None,
            "token_bytes_per_element": token_column_bytes_per_element(store, manifest),
            "wall_seconds": round(seconds, 2)}


def print_summary(summary):
    """A readable block on stderr, then the summary as one JSON line on stdout."""
    rows = [("store", summary["store"]),
            ("shards", f"{summary['shards']} committed, {summary['failed_shards']} failed"),
            ("images", f"{summary['images']} stored, {summary['failures']} failure records "
                       f"({summary['duplicates']} duplicate ids)"),
            ("bytes per image", f"{summary['bytes_per_image']} (whole shard files)"),
            ("token bytes/element", summary["token_bytes_per_element"]),
            ("precision", summary["precision"]["precision"] + (f" (auto: {summary['precision']['why']})"
                                                              if summary["precision"]["asked"] == "auto" else "")),
            ("wall time", f"{summary['wall_seconds']} s")]
    for k, v in rows:
        print(f"  {k:<20} {v}", file=sys.stderr)
    print(json.dumps(summary))


def main(argv=None):
    job_main(run, argv, print_summary)


if __name__ == "__main__":
    main()
    finish(0)
