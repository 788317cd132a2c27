"""GPU check and timing of precompute (run on a machine with a CUDA device).

    python -m bench.gpu_precompute --out DIR [--shards 8 --per_shard 1024 --workers 8 --budget_s 120]
    python -m bench.gpu_precompute --out DIR --tiny --device cpu    # the same steps, small, on a CPU

1. Builds a ViT-B-16 @224 checkpoint with random weights + a 64 x 384 adapter (the paper's shape);
   ``--tiny`` uses the embedded 64 px default checkpoint instead.
2. Writes demo shards of real-photo crops (scikit-image), **JPEG only** (``formats`` in the JSON),
   in parallel.
3. Checks the tensor decode path against PIL on this device: torchvision.io.decode_jpeg (nvjpeg on
   CUDA) + torch resize/crop/normalise vs PIL + open_clip's transform (mean/max abs difference in
   normalised units).
4. Times, each run in its own try/except, JSON saved after each (DIR/gpu_precompute.json):
   - forward only (resident batch): the ceiling;
   - plain loops without Beam: PIL decode (no writes), and GPU decode + forward + int8 quantize +
     Parquet write; and the job's own per-shard code (EncodeShardFn) called in a loop;
   - the real Beam job (`pipeline.precompute --device cuda --precision bf16`): PIL decode in-process
     (on ``--pil_shards`` shards only: it is slow), then ``--decode torchvision`` in-process and
     multi-process (``--workers``). ``images_per_s`` is wall time including start-up;
     ``encode_img_s_per_worker`` is rows / the summed per-shard seconds of the stats records
     (decode + forward + quantize + write, model loading excluded).
5. Checks correctness: stored tokens vs an fp32 CPU forward of the same images through PIL
   (int8 + bf16 + decoder error), and runs verify on each store.
Runs that would start after ``--budget_s`` seconds are skipped (recorded as such).
"""
import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

JPEG_ONLY = (("jpg", "JPEG"),)


def make_checkpoint(path):
    from models.adapter import AdapterConfig, TokenCompressionAdapter
    from models.backbone import Backbone, BackboneConfig
    from models.checkpoint import CheckpointConfig, save_checkpoint
    torch.manual_seed(0)
    cfg = CheckpointConfig(BackboneConfig(model_name="ViT-B-16"),
                           AdapterConfig(num_tokens=64, input_dim=768, output_dim=384, num_heads=8, mlp_dim=3072),
                           description="random ViT-B-16 + adapter, for timing")
    return save_checkpoint(path, cfg, {"backbone": Backbone(cfg.backbone, load_pretrained=False),
                                       "adapter": TokenCompressionAdapter(cfg.adapter)})


def _write_one(args):
    from scenes.photos import demo_samples, write_shard
    directory, shard, per_shard = args
    write_shard(os.path.join(directory, f"{shard:05d}.tar"), demo_samples(shard, per_shard, formats=JPEG_ONLY))


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _images(path, limit=None):
    """(key, image bytes) of a shard, in tar order."""
    from transforms.tar_samples import iter_samples
    with open(path, "rb") as f:
        for s in iter_samples(f):
            if limit is not None and limit <= 0:
                return
            if s.image_extension() is not None:
                yield s.key, s.members[s.image_extension()]
                limit = None if limit is None else limit - 1


def plain_loop(ckpt, shard_paths, batch_size, precision, device):
    """The same work without Beam: read, PIL decode, open_clip preprocess, forward, quantize (no writes)."""
    from schemas.quantization import quantize_int8
    from transforms.image_decode import decode_image
    from transforms.vision_handler import VisionModelHandler
    handler = VisionModelHandler(ckpt, device, precision, 1, batch_size)
    model = handler.load_model()
    transform = model.backbone.image_transform()
    n, t0, pending = 0, None, []

    def forward():
        for out in handler.run_inference(pending, model):
            quantize_int8(out.tokens[None])

    for path in shard_paths:
        for _, data in _images(path):
            pending.append(transform(decode_image(data)))
            if len(pending) == batch_size:
                forward()
                if t0 is None:
                    t0 = time.time()  # the first batch warms up (model load, kernels): not counted
                else:
                    n += len(pending)
                pending = []
    if pending:
        forward()
        n += len(pending)
    _sync(device)
    return {"img_s": round(n / (time.time() - t0), 1), "images": n, "shards": len(shard_paths)}


def plain_loop_tensor_decode(ckpt, shard_paths, batch_size, precision, device, out_dir):
    """Without Beam: read, decode a batch of JPEGs at once on the device (nvjpeg on CUDA), torch
    resize/crop/normalise, forward, int8 quantize per image, Parquet write (zstd, as the store)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from schemas.quantization import quantize_int8
    from schemas.token_store import PARQUET_WRITE_OPTIONS, TOKEN_ROW_GROUP_SIZE, token_schema
    from transforms.tensor_decode import TensorJpegDecoder, TensorPreprocess
    from transforms.vision_handler import VisionModelHandler
    handler = VisionModelHandler(ckpt, device, precision, 1, batch_size)
    model = handler.load_model()
    pre, dec = TensorPreprocess.for_backbone(model.backbone), TensorJpegDecoder(device)
    enc = model.adapter.cfg
    schema = token_schema(enc.num_tokens, enc.output_dim, model.backbone.embedding_dim)
    os.makedirs(out_dir, exist_ok=True)
    n, refused, t0, t_decode = 0, 0, None, 0.0
    for path in shard_paths:
        items = list(_images(path))
        with pq.ParquetWriter(os.path.join(out_dir, os.path.basename(path) + ".parquet"), schema,
                              **PARQUET_WRITE_OPTIONS) as writer:
            rows = []
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                td = time.time()
                decoded = dec.decode([d for _, d in chunk])
                keys = [k for (k, _), im in zip(chunk, decoded) if im is not None]
                refused += len(chunk) - len(keys)
                x = pre.normalize(torch.stack([pre.resize_crop(im) for im in decoded if im is not None]))
                t_decode += time.time() - td
                for key, out in zip(keys, handler.run_inference(list(x), model)):
                    q, scales = quantize_int8(out.tokens[None])
                    rows.append((key, q.tobytes(), scales.astype("<f4").tobytes(),
                                 out.embedding.astype("<f2").tobytes(), None, None))
                while len(rows) >= TOKEN_ROW_GROUP_SIZE:
                    chunk_rows, rows = rows[:TOKEN_ROW_GROUP_SIZE], rows[TOKEN_ROW_GROUP_SIZE:]
                    writer.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in
                                                             zip(zip(*chunk_rows), schema)], schema=schema))
                if t0 is None:
                    t0, t_decode = time.time(), 0.0  # first batch: warm-up, not counted
                else:
                    n += len(keys)
            if rows:
                writer.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(zip(*rows), schema)],
                                                        schema=schema))
    _sync(device)
    secs = time.time() - t0
    return {"img_s": round(n / secs, 1), "images": n, "shards": len(shard_paths), "refused_by_tensor_decoder": refused,
            "decode_preprocess_share": round(t_decode / secs, 3)}


def encode_fn_loop(ckpt, shard_paths, store, batch_size, precision, device, decode):
    """The job's own per-shard step (EncodeShardFn: decode, forward, quantize, Parquet + stats
    write) called in a loop, without Beam (no runner start-up, no workers)."""
    from collections import defaultdict
    from models.checkpoint import embedding_dim, fingerprint, read_config
    from transforms.encode_shard import EncodeConfig, EncodeShardFn
    from transforms.shard_files import ShardSpec
    cfg = read_config(ckpt)
    fn = EncodeShardFn(EncodeConfig(
        store=store, checkpoint=ckpt, fingerprint=fingerprint(ckpt), num_tokens=cfg.adapter.num_tokens,
        token_dim=cfg.adapter.output_dim, embedding_dim=embedding_dim(cfg.backbone), batch_size=batch_size,
        device=device, precision=precision, decode=decode))
    import shutil
    shutil.rmtree(store, ignore_errors=True)
    t = time.time()
    fn.setup()
    setup_s = time.time() - t
    recs = []
    for i, path in enumerate(shard_paths):
        spec = ShardSpec(i, os.path.basename(path)[:-4], path)
        recs.extend(fn.process(spec, defaultdict(list)))
    rows = sum(r["rows"] for r in recs)
    secs = [r["seconds"] for r in recs]
    later = sum(r["rows"] for r in recs[1:])
    return {"img_s": round(rows / sum(secs), 1), "images": rows, "failed": sum(r["failed"] for r in recs),
            "img_s_after_first_shard": round(later / sum(secs[1:]), 1) if later else None,
            "setup_s": round(setup_s, 1), "shard_seconds": secs}


def forward_only(ckpt, batch_size, precision, device, image_size, iters=20):
    """GPU forward of backbone + adapter alone on a resident batch: the ceiling."""
    from models.checkpoint import load_vision_encoder
    from transforms.vision_handler import PRECISIONS
    enc, _, _ = load_vision_encoder(ckpt, device)
    x = torch.randn(batch_size, 3, *image_size, device=device)
    dtype = PRECISIONS[precision]
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype or torch.float32,
                                                enabled=dtype is not None):
        for _ in range(3):
            enc(x)
        _sync(device)
        t = time.time()
        for _ in range(iters):
            enc(x)
        _sync(device)
    return round(batch_size * iters / (time.time() - t), 1)


def decode_check(ckpt, shard_path, batch_size, device, compare=64):
    """Tensor decode + preprocessing on ``device`` vs PIL + open_clip transform: pixel agreement on
    ``compare`` images, and decode + preprocess throughput alone over the shard."""
    import torchvision
    from models.checkpoint import load_vision_encoder
    from transforms.image_decode import decode_image
    from transforms.tensor_decode import TensorJpegDecoder, TensorPreprocess, fast_jpeg_size
    enc, _, _ = load_vision_encoder(ckpt, "cpu")
    transform, pre, dec = enc.backbone.image_transform(), TensorPreprocess.for_backbone(enc.backbone), \
        TensorJpegDecoder(device)
    items = list(_images(shard_path))
    plain = sum(fast_jpeg_size(d) is not None for _, d in items)
    diffs, maxes, refused = [], [], 0
    for i in range(0, min(compare, len(items)), batch_size):
        datas = [d for _, d in items[i:min(i + batch_size, compare)]]
        for data, im in zip(datas, dec.decode(datas)):
            if im is None:
                refused += 1
                continue
            got = pre.normalize(pre.resize_crop(im)[None])[0].cpu()
            d = (got - transform(decode_image(data))).abs()
            diffs.append(float(d.mean()))
            maxes.append(float(d.max()))
    n, t = 0, None
    for i in range(0, len(items), batch_size):
        decoded = [im for im in dec.decode([d for _, d in items[i:i + batch_size]]) if im is not None]
        pre.normalize(torch.stack([pre.resize_crop(im) for im in decoded]))
        _sync(device)
        if t is None:
            t = time.time()
        else:
            n += len(decoded)
    return {"torchvision": torchvision.__version__, "plain_jpegs": f"{plain}/{len(items)}",
            "refused": refused, "compared": len(diffs),
            "mean_abs_diff": round(float(np.mean(diffs)), 6) if diffs else None,
            "worst_image_mean_abs_diff": round(max(diffs), 6) if diffs else None,
            "max_abs_diff": round(max(maxes), 4) if maxes else None,
            "decode_preprocess_img_s": round(n / (time.time() - t), 1) if n else None}


def run_job(ckpt, pattern, store, extra, device):
    from pipeline import precompute
    args = ["--input", pattern, "--output", store, "--runner=DirectRunner", "--progress=off", "--device", device]
    if ckpt:
        args += ["--checkpoint", ckpt]
    t = time.time()
    summary = precompute.run(args + list(extra))
    summary["images_per_s"] = round(summary["images"] / (time.time() - t), 1)
    stats = [json.load(open(os.path.join(store, "stats", p))) for p in sorted(os.listdir(os.path.join(store, "stats")))]
    summary["encode_img_s_per_worker"] = round(sum(r["rows"] for r in stats) / sum(r["seconds"] for r in stats), 1)
    summary.pop("metrics", None)
    return summary


def check_tokens(ckpt, store, shard_path):
    """Stored (GPU, maybe bf16, maybe GPU-decoded) tokens vs an fp32 CPU forward of the same images via PIL."""
    import pyarrow.parquet as pq
    from models.checkpoint import load_vision_encoder
    from schemas.quantization import decode_tokens
    from schemas import manifest as mf
    from transforms.image_decode import decode_image
    model = mf.read(store)["model"]
    enc, cfg, _ = load_vision_encoder(ckpt, "cpu")
    transform = enc.backbone.image_transform()
    table = pq.read_table(os.path.join(store, "shards", "00000.parquet")).slice(0, 8).to_pylist()
    want = {k: transform(decode_image(d)) for k, d in _images(shard_path, limit=8)}
    x = torch.stack([want[r["image_id"]] for r in table])
    with torch.no_grad():
        ref = enc(x)[0].numpy()
    got = np.stack([decode_tokens(r["tokens"], r["token_scales"], model["num_tokens"], model["token_dim"])
                    for r in table])
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    return {"min_token_cosine_vs_cpu_fp32": round(float(cos.min()), 6),
            "max_abs_err_over_absmax": round(float((np.abs(got - ref).max(-1) / np.abs(ref).max(-1)).max()), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/edje-gpu")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per_shard", type=int, default=1024)
    ap.add_argument("--pil_shards", type=int, default=1, help="shards for the (slow) PIL-decode Beam run")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--budget_s", type=float, default=120,
                    help="runs that would start later are skipped (the last one may take ~30 s more)")
    ap.add_argument("--tiny", action="store_true",
                    help="embedded 64 px checkpoint, 2 shards x 24 images, batch 8, 2 workers: proves the "
                         "bench runs (e.g. --device cpu), measures nothing")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shards, args.per_shard, args.pil_shards, args.workers, args.batch_size = 2, 24, 1, 2, 8
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    shards_dir = os.path.join(args.work, "shards")
    os.makedirs(shards_dir, exist_ok=True)
    cuda = args.device.startswith("cuda")
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "cpus": os.cpu_count(), "images": args.shards * args.per_shard, "formats": "jpg only",
           "batch_size": args.batch_size, "precision": args.precision, "tiny": args.tiny}

    def save():
        with open(os.path.join(args.out, "gpu_precompute.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res), flush=True)

    def attempt(name, fn):
        if time.time() - t_start > args.budget_s:
            res[name] = {"skipped": f"past --budget_s {args.budget_s}"}
        else:
            t = time.time()
            try:
                res[name] = fn()
            except Exception as e:  # keep the other measurements
                res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            res.setdefault("run_seconds", {})[name] = round(time.time() - t, 1)
        save()

    import shutil
    from models.checkpoint import fingerprint, load_vision_encoder
    t = time.time()
    if args.tiny:
        ckpt = None  # the embedded default checkpoint
        res["fingerprint"] = fingerprint(None)
    else:
        ckpt = os.path.join(args.work, "ckpt")
        res["fingerprint"] = make_checkpoint(ckpt)
    image_size = load_vision_encoder(ckpt, "cpu")[0].backbone.image_size
    image_size = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    for p in os.listdir(shards_dir):
        os.unlink(os.path.join(shards_dir, p))
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
        list(ex.map(_write_one, [(shards_dir, s, args.per_shard) for s in range(args.shards)]))
    res["setup_s"] = round(time.time() - t, 1)
    save()
    paths = sorted(os.path.join(shards_dir, p) for p in os.listdir(shards_dir))
    pattern = os.path.join(shards_dir, f"{{00000..{args.shards - 1:05d}}}.tar")
    pil_pattern = os.path.join(shards_dir, f"{{00000..{args.pil_shards - 1:05d}}}.tar")
    prec, bs, dev = args.precision, args.batch_size, args.device
    common = ["--precision", prec, "--batch_size", str(bs)]
    mp = [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    from schemas.verify import verify

    def job(name, pat, extra):
        def go():
            store = os.path.join(args.work, f"store-{name}")
            shutil.rmtree(store, ignore_errors=True)
            s = run_job(ckpt, pat, store, common + extra, dev)
            s["verify_ok"] = verify(store)["ok"]
            s.update(check_tokens(ckpt, store, paths[0]))
            return s
        return go

    attempt("decode_check", lambda: decode_check(ckpt, paths[0], bs, dev))
    attempt(f"forward_only_img_s_{prec}", lambda: forward_only(ckpt, bs, prec, dev, image_size))
    attempt(f"beam_inprocess_{prec}_torchvision", job(f"inprocess-{prec}-tv", pattern, ["--decode", "torchvision"]))
    attempt(f"beam_mp{args.workers}_{prec}_torchvision",
            job(f"mp-{prec}-tv", pattern, ["--decode", "torchvision"] + mp))
    attempt(f"plain_loop_tensor_decode_{prec}",
            lambda: plain_loop_tensor_decode(ckpt, paths, bs, prec, dev, os.path.join(args.work, "plain-out")))
    attempt(f"encode_fn_loop_{prec}_torchvision",
            lambda: encode_fn_loop(ckpt, paths, os.path.join(args.work, "store-fnloop"), bs, prec, dev, "torchvision"))
    attempt(f"plain_loop_pil_{prec}", lambda: plain_loop(ckpt, paths[:1], bs, prec, dev))
    attempt(f"beam_inprocess_{prec}_pil_{args.pil_shards}_shards",
            job(f"inprocess-{prec}-pil", pil_pattern, ["--decode", "pil"]))
    res["total_s"] = round(time.time() - t_start, 1)
    save()


if __name__ == "__main__":
    sys.exit(main())
