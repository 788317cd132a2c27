"""GPU check and timing of precompute (run on a machine with a CUDA device).

    python -m bench.gpu_precompute --out DIR [--shards 8 --per_shard 512 --workers 8]

1. Builds a ViT-B-16 @224 checkpoint with random weights + a 64 x 384 adapter (the paper's shape).
2. Writes demo shards of real-photo crops (scikit-image), in parallel.
3. Times a plain torch loop (decode + preprocess + forward + int8 quantize, no Beam, no writes)
   and the real Beam job (`pipeline.precompute --device cuda`), in-process and multi-process.
4. Checks correctness: stored tokens vs an fp32 CPU forward of the same images (int8 error),
   and runs verify on each store.
Writes DIR/gpu_precompute.json and prints it.
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch


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
    from pipeline.make_demo_shards import demo_samples, write_shard
    directory, shard, per_shard = args
    write_shard(os.path.join(directory, f"{shard:05d}.tar"), demo_samples(shard, per_shard))


def plain_loop(ckpt, shard_paths, batch_size, precision):
    """The same work without Beam: read, decode, preprocess, forward, quantize."""
    from models.quantization import quantize_int8
    from transforms.image_decode import decode_image
    from transforms.tar_samples import iter_samples
    from transforms.vision_handler import VisionModelHandler
    handler = VisionModelHandler(ckpt, "cuda", precision, 1, batch_size)
    model = handler.load_model()
    transform = model.backbone.image_transform()
    n, t0 = 0, None
    for path in shard_paths:
        with open(path, "rb") as f:
            pending = []
            for s in iter_samples(f):
                if s.image_extension() is None:
                    continue
                pending.append(transform(decode_image(s.members[s.image_extension()])))
                if len(pending) == batch_size:
                    for out in handler.run_inference(pending, model):
                        quantize_int8(out.tokens[None])
                    if t0 is None:
                        t0 = time.time()  # the first batch warms up (model load, kernels): not counted
                    else:
                        n += len(pending)
                    pending = []
            for out in handler.run_inference(pending, model) if pending else []:
                quantize_int8(out.tokens[None])
            n += len(pending)
    torch.cuda.synchronize()
    return n / (time.time() - t0)


def forward_only(ckpt, batch_size, precision, iters=20):
    """GPU forward of backbone + adapter alone on a resident batch: the ceiling."""
    from models.checkpoint import load_vision_encoder
    from transforms.vision_handler import PRECISIONS
    enc, _, _ = load_vision_encoder(ckpt, "cuda")
    x = torch.randn(batch_size, 3, 224, 224, device="cuda")
    dtype = PRECISIONS[precision]
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(3):
            enc(x)
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(iters):
            enc(x)
        torch.cuda.synchronize()
    return batch_size * iters / (time.time() - t)


def run_job(ckpt, pattern, store, extra):
    from pipeline import precompute
    t = time.time()
    summary = precompute.run(["--input", pattern, "--output", store, "--checkpoint", ckpt,
                              "--runner=DirectRunner", "--progress=off", "--device", "cuda", *extra])
    summary["images_per_s"] = round(summary["images"] / (time.time() - t), 1)
    return summary


def check_tokens(ckpt, store, shard_path):
    """Stored (GPU, maybe bf16) tokens vs an fp32 CPU forward of the same images."""
    import pyarrow.parquet as pq
    from models.checkpoint import load_vision_encoder
    from models.quantization import decode_tokens
    from transforms.image_decode import decode_image
    from transforms.tar_samples import iter_samples
    enc, cfg, _ = load_vision_encoder(ckpt, "cpu")
    transform = enc.backbone.image_transform()
    table = pq.read_table(os.path.join(store, "shards", "00000.parquet")).slice(0, 8).to_pylist()
    want = {}
    with open(shard_path, "rb") as f:
        for s in iter_samples(f):
            if len(want) == 8:
                break
            want[s.key] = transform(decode_image(s.members[s.image_extension()]))
    x = torch.stack([want[r["image_id"]] for r in table])
    with torch.no_grad():
        ref = enc(x)[0].numpy()
    got = np.stack([decode_tokens(r["tokens"], r["token_scales"], 64, 384) for r in table])
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    return {"min_token_cosine_vs_cpu_fp32": float(cos.min()),
            "max_abs_err_over_absmax": float((np.abs(got - ref).max(-1) / np.abs(ref).max(-1)).max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/edje-gpu")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per_shard", type=int, default=512)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=256)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    shards_dir = os.path.join(args.work, "shards")
    os.makedirs(shards_dir, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cpus": os.cpu_count(),
           "images": args.shards * args.per_shard, "batch_size": args.batch_size}

    def save():
        with open(os.path.join(args.out, "gpu_precompute.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res), flush=True)

    ckpt = os.path.join(args.work, "ckpt")
    t = time.time()
    res["fingerprint"] = make_checkpoint(ckpt)
    with ProcessPoolExecutor(16) as ex:
        list(ex.map(_write_one, [(shards_dir, s, args.per_shard) for s in range(args.shards)]))
    res["setup_s"] = round(time.time() - t, 1)
    save()
    paths = sorted(os.path.join(shards_dir, p) for p in os.listdir(shards_dir))
    pattern = os.path.join(shards_dir, f"{{00000..{args.shards - 1:05d}}}.tar")
    for prec in ("bf16", "fp32"):
        res[f"forward_only_img_s_{prec}"] = round(forward_only(ckpt, args.batch_size, prec), 1)
        save()
    res["plain_loop_img_s_bf16"] = round(plain_loop(ckpt, paths[:2], args.batch_size, "bf16"), 1)
    save()
    from pipeline.verify import verify
    runs = {"beam_inprocess_bf16": ["--precision", "bf16", "--batch_size", str(args.batch_size)],
            "beam_mp_bf16": ["--precision", "bf16", "--batch_size", str(args.batch_size),
                             f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"],
            "beam_mp_fp32": ["--precision", "fp32", "--batch_size", str(args.batch_size),
                             f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]}
    for name, extra in runs.items():
        store = os.path.join(args.work, f"store-{name}")
        try:
            s = run_job(ckpt, pattern, store, extra)
            s["verify_ok"] = verify(store)["ok"]
            s.update(check_tokens(ckpt, store, paths[0]))
            res[name] = s
        except Exception as e:  # keep the other measurements
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        save()


if __name__ == "__main__":
    sys.exit(main())
