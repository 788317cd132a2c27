"""CPU overhead ratios of the Beam jobs (run by hand, never by the test suite).

    HF_HUB_OFFLINE=1 python -m bench.cpu [--quick] [--work DIR] [--json_out FILE]

Builds, in a temp dir, a checkpoint with a ViT-S-ish backbone (224 px, patch 16, width 384,
6 layers, random weights) + a 64 x 384 adapter + the default joint encoder (MiniLM, only pooler
and head stored, as models/make_default.py does), demo shards (pipeline.make_demo_shards), and
measures:

* precompute_ratio: images/s of the Beam precompute job (in-process DirectRunner) / a plain torch
  loop doing the same read + decode + preprocess + forward + int8 quantize (no Beam, no writes),
  same batch size and torch_threads=1. Alternating A/B, best of N. The plain loop is timed after
  the model is loaded (``*_incl_load`` also counts the load); the Beam job's wall time counts
  everything (planning, model load, duplicate scan, writes, index, manifest).
* rerank_ratio: pairs/s of the Beam rerank job / models.joint_encoder.score_batch over the same
  dequantized tokens and texts (batch 64, torch_threads 1; tokens read before timing), on
  ``--queries`` x 20 pairs (4,000 by default). A 20-query job (400 pairs) also runs: from the two
  job times, rerank_job_fixed_seconds (what a job costs before and after its pairs: pipeline
  construction, Beam's stages, the model load) and rerank_ratio_steady (the rate per pair beyond it).
* token_bytes_per_element: tokens + token_scales compressed bytes / (rows x 64 x 384), on the real
  store. Random-weight models emit near-duplicate tokens that zstd squeezes, so the same measure on
  the synthetic store of random int8 tokens is reported too (token_bytes_per_element_random_int8).
* score_spearman_int8_vs_fp32: Spearman of joint-encoder scores from stored int8 tokens vs fp32
  adapter outputs of the same decoded images, pooled over all rerank pairs (queries differ in text,
  which int8 does not touch); score_spearman_per_query_{min,mean} rank only each query's candidates.
* score_spearman_int4_vs_fp32 (+ _per_query_{min,mean}): the same, with the same fp32 tokens put
  through ``--quantization int4``'s encode + decode (int4_absmax_channel_token), on the same pairs;
  int4_bytes_per_image_64x384 / int8_bytes_per_image_64x384: tokens + token_scales bytes per row.
* rerank_rss_ratio_10x: peak RSS (ru_maxrss via os.wait4) of ``python -m pipeline.rerank`` on the
  same queries against a >=100k-image store / a >=10k-image store (random int8 tokens, written
  through the project's writer, real manifest + index).

Prints a readable table on stderr and one JSON line on stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

VIT_S = {
    "embed_dim": 384,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 384, "layers": 6, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
TEXTS = ["an astronaut in a white suit", "a tabby cat sleeping on a sofa", "a cup of coffee on a table",
         "a rocket on a launch pad", "gravel and small stones", "a page of printed text",
         "a camera man with a tripod", "a horse in a field", "coins on a wooden table", "a red rose"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
SMALL_JOB_QUERIES = 20  # the small rerank job (400 pairs) that measures the job's fixed cost



def alternate(repeats, first, second):
    """Runs first/second `repeats` times each, alternating which goes first (drift cancels out)."""
    for rep in range(repeats):
        for fn in ((first, second) if rep % 2 == 0 else (second, first)):
            fn(rep)

def log(msg):
    print(f"[bench.cpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- setup
def make_checkpoint(path):
    from models.adapter import AdapterConfig, TokenCompressionAdapter
    from models.backbone import Backbone, BackboneConfig
    from models.checkpoint import CheckpointConfig, save_checkpoint
    from models.joint_encoder import JointEncoder, JointEncoderConfig
    torch.manual_seed(0)
    cfg = CheckpointConfig(
        backbone=BackboneConfig(model_config=VIT_S),
        adapter=AdapterConfig(num_tokens=64, input_dim=384, output_dim=384, num_heads=6, mlp_dim=1536),
        joint_encoder=JointEncoderConfig(),
        description="bench.cpu: random ViT-S-ish (224/16, w384, 6 layers) + 64x384 adapter + default joint encoder")
    joint = JointEncoder(cfg.joint_encoder)
    joint_part = {k: v for k, v in joint.state_dict().items()
                  if k.startswith("head.") or k[len("bert."):] in joint.bert.base_missing_keys}
    return save_checkpoint(path, cfg, {"backbone": Backbone(cfg.backbone, load_pretrained=False),
                                       "adapter": TokenCompressionAdapter(cfg.adapter), "joint": joint_part})


def make_shards(directory, shards, per_shard):
    from scenes.photos import demo_samples, write_shard
    os.makedirs(directory, exist_ok=True)
    paths = []
    for s in range(shards):
        p = os.path.join(directory, f"{s:05d}.tar")
        write_shard(p, demo_samples(s, per_shard))
        paths.append(p)
    return paths


# ---------------------------------------------------------------- precompute
def run_precompute(ckpt, pattern, store, batch_size, precision="fp32"):
    from pipeline import precompute
    t = time.perf_counter()
    summary = precompute.run(["--input", pattern, "--output", store, "--checkpoint", ckpt,
                              "--batch_size", str(batch_size), "--torch_threads", "1", "--precision", precision,
                              "--runner=DirectRunner", "--progress=off"])
    dt = time.perf_counter() - t
    return summary["images"] / dt, summary


def plain_precompute(ckpt, shard_paths, batch_size):
    """read + decode + preprocess + forward + int8 quantize, in shard order, batches cut per shard."""
    from schemas.quantization import quantize_int8
    from transforms.image_decode import decode_image
    from transforms.tar_samples import iter_samples
    from transforms.vision_handler import VisionModelHandler
    t_load = time.perf_counter()
    handler = VisionModelHandler(ckpt, "cpu", "fp32", 1, batch_size)
    model = handler.load_model()
    transform = model.backbone.image_transform()
    t0 = time.perf_counter()
    n = 0

    def flush(pending):
        outs = handler.run_inference(pending, model)
        quantize_int8(np.stack([o.tokens for o in outs]))
        return len(pending)

    for path in shard_paths:
        with open(path, "rb") as f:
            pending = []
            for s in iter_samples(f):
                ext = s.image_extension()
                if ext is None:
                    continue
                pending.append(transform(decode_image(s.members[ext])))
                if len(pending) == batch_size:
                    n += flush(pending)
                    pending = []
            if pending:
                n += flush(pending)
    t1 = time.perf_counter()
    return n / (t1 - t0), n / (t1 - t_load), n


# ---------------------------------------------------------------- rerank
def make_queries(path, ids, n_queries, n_cands, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        cands = [str(x) for x in rng.choice(ids, size=n_cands, replace=False)]
        rows.append({"query_id": f"q{q:03d}", "text": TEXTS[q % len(TEXTS)] + f" #{q}", "candidates": cands,
                     "candidate_scores": [float(x) for x in rng.uniform(0, 1, n_cands)]})
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def run_rerank(ckpt, queries, store, output, precision="fp32"):
    from pipeline import rerank
    t = time.perf_counter()
    summary = rerank.run(["--queries", queries, "--store", store, "--output", output, "--checkpoint", ckpt,
                          "--batch_size", "64", "--torch_threads", "1", "--precision", precision,
                          "--runner=DirectRunner", "--progress=off"])
    dt = time.perf_counter() - t
    return summary["pairs"] / dt, summary


def bare_rerank(ckpt, texts, tokens, batch_size=64, precision="fp32"):
    from models.checkpoint import load_scorer
    from models.joint_encoder import score_batch
    t_load = time.perf_counter()
    torch.set_num_threads(1)
    model, tok, _, _ = load_scorer(ckpt, "cpu", precision)  # what the job runs
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            out.append(score_batch(model, tok, texts[i:i + batch_size], tokens[i:i + batch_size]))
    t1 = time.perf_counter()
    return len(texts) / (t1 - t0), len(texts) / (t1 - t_load), np.concatenate(out)


def store_ids(store):
    """Every image id of a store, sorted."""
    import pyarrow.parquet as pq
    from schemas.reader import TokenStore
    ts = TokenStore(store)
    return sorted(i for s in ts.shards for i in pq.read_table(ts.shard_file(s), columns=["image_id"]).column(0).to_pylist())


def pairs_of(rows):
    return [(r["query_id"], r["text"], c) for r in rows for c in r["candidates"]]


def fp32_tokens(ckpt, shard_paths, ids):
    """fp32 adapter outputs for the given ids, from the same decoded images."""
    from models.checkpoint import load_vision_encoder
    from transforms.image_decode import decode_image
    from transforms.tar_samples import iter_samples
    torch.set_num_threads(1)
    enc, _, _ = load_vision_encoder(ckpt, "cpu")
    transform = enc.backbone.image_transform()
    wanted, images = set(ids), {}
    for path in shard_paths:
        with open(path, "rb") as f:
            for s in iter_samples(f):
                if s.key in wanted:
                    images[s.key] = transform(decode_image(s.members[s.image_extension()]))
    keys = sorted(images)
    out = {}
    with torch.inference_mode():
        for i in range(0, len(keys), 32):
            toks, _ = enc(torch.stack([images[k] for k in keys[i:i + 32]]))
            out.update(zip(keys[i:i + 32], toks.float().numpy()))
    return out


def spearman(a, b):
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).correlation)


# ---------------------------------------------------------------- synthetic stores for RSS
def agreement(scores, fp32_scores, n_cands, name, per_query_prefix):
    """Pooled and per-query (consecutive blocks of n_cands) Spearman of scores vs fp32, max |diff|."""
    per_q = [spearman(scores[i:i + n_cands], fp32_scores[i:i + n_cands]) for i in range(0, len(scores), n_cands)]
    return {f"score_spearman_{name}_vs_fp32": round(spearman(scores, fp32_scores), 6),
            f"{per_query_prefix}_min": round(min(per_q), 6),
            f"{per_query_prefix}_mean": round(float(np.mean(per_q)), 6),
            f"score_max_abs_diff_{name}_vs_fp32": float(np.abs(scores - fp32_scores).max())}


def write_synthetic_store(store, model, n_shards, rows_per_shard, seed=0, link_from=None):
    """Random int8 tokens through the project's writer; real manifest + index. With ``link_from``
    (a list of (name, path, info) already written), those shard files are hard-linked, not rewritten."""
    import pyarrow as pa
    from schemas import columns as C
    from schemas import index as idx
    from schemas import manifest as mf
    from schemas import shard_stats, storage
    from schemas.token_store import QUANT_SCHEME, TOKEN_ROW_GROUP_SIZE, token_schema
    from transforms.write_index import write_bucket
    from transforms.write_manifest import build_manifest
    m, h, d = model["num_tokens"], model["token_dim"], model["embedding_dim"]
    schema = token_schema(m, h, d).with_metadata({
        "edje.fingerprint": model["fingerprint"], "edje.quantization": QUANT_SCHEME,
        "edje.num_tokens": str(m), "edje.token_dim": str(h)})
    os.makedirs(os.path.join(store, C.SHARDS_DIR), exist_ok=True)
    rng = np.random.default_rng(seed)
    records, entries, written = [], {}, []
    for s in range(n_shards):
        name = f"s{s:05d}"
        rel = f"{C.SHARDS_DIR}/{name}.parquet"
        ids = [f"img{s * rows_per_shard + r:08d}" for r in range(rows_per_shard)]
        if link_from is not None and s < len(link_from):
            _, src, info = link_from[s]
            os.link(src, os.path.join(store, rel))
        else:
            tokens = rng.integers(-127, 128, size=(rows_per_shard, m * h), dtype=np.int8)
            scales = rng.uniform(0.005, 0.05, size=(rows_per_shard, m)).astype("<f4")
            emb = rng.standard_normal((rows_per_shard, d)).astype(np.float32)
            emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype("<f2")
            table = pa.table({
                C.IMAGE_ID: pa.array(ids, pa.string()),
                C.TOKENS: pa.FixedSizeBinaryArray.from_buffers(pa.binary(m * h), rows_per_shard,
                                                             [None, pa.py_buffer(tokens.tobytes())]),
                C.TOKEN_SCALES: pa.FixedSizeBinaryArray.from_buffers(pa.binary(m * 4), rows_per_shard,
                                                                   [None, pa.py_buffer(scales.tobytes())]),
                C.EMBEDDING: pa.FixedSizeBinaryArray.from_buffers(pa.binary(d * 2), rows_per_shard,
                                                                [None, pa.py_buffer(emb.tobytes())]),
                C.CAPTION: pa.array([None] * rows_per_shard, pa.string()),
                C.METADATA: pa.array([None] * rows_per_shard, pa.string()),
            }, schema=schema)
            info = storage.write_parquet_atomic(storage.join(store, rel), schema, table.to_batches(),
                                                TOKEN_ROW_GROUP_SIZE)
        written.append((name, os.path.join(store, rel), info))
        records.append({"name": name, "source": f"synthetic/{name}.tar", "ordinal": s,
                        "status": shard_stats.STATUS_OK, "rows": rows_per_shard, "failed": 0, "duplicates": 0,
                        "shard": dict(info, path=rel), "failures": None})
        for r, i in enumerate(ids):
            entries[i] = (name, r)
    buckets = idx.default_buckets(n_shards)
    by_bucket = [[] for _ in range(buckets)]
    for i, (name, r) in entries.items():
        by_bucket[idx.bucket_of(i, buckets)].append((i, name, r))
    index_files = [write_bucket(store, buckets, b, by_bucket[b]) for b in range(buckets)]
    manifest = build_manifest(records, index_files, buckets=buckets, model=model, inputs="synthetic",
                              missing=[], producer={"quantization": QUANT_SCHEME, "synthetic": True})
    mf.write(store, manifest)
    return written


def child_rerank_rss_via_getrusage(ckpt, queries, store, output):
    """Peak RSS of one child via RUSAGE_CHILDREN: ru_maxrss of children is the max over all reaped
    children, so the largest child must run last (or first in a fresh process). We therefore run each
    measurement in a fresh helper process that starts one rerank child and reports its rusage."""
    code = ("import os,resource,subprocess,sys,json,time;"
            "t=time.perf_counter();r=subprocess.run(sys.argv[1:],capture_output=True);"
            "ru=resource.getrusage(resource.RUSAGE_CHILDREN);"
            "print(json.dumps({'rc':r.returncode,'maxrss_kib':ru.ru_maxrss,'s':time.perf_counter()-t,"
            "'out':r.stdout.decode()[-400:],'err':r.stderr.decode()[-2000:]}))")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "pipeline.rerank", "--queries", queries,
           "--store", store, "--output", output, "--checkpoint", ckpt, "--runner=DirectRunner"]
    res = json.loads(subprocess.run(cmd, env=ENV, capture_output=True, check=True,
                                    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                                    ).stdout.decode().strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"rerank child failed: {res['err']}")
    return res["maxrss_kib"] / 1024, res["s"], res["out"].strip().splitlines()[-1]


def measure_rerank(res, ckpt, store, work, repeats, n_queries, n_cands):
    """rerank_ratio: the Beam job vs bare score_batch on the same pairs (alternating, best of N)."""
    from schemas.reader import TokenStore
    import pyarrow.parquet as pq
    ts = TokenStore(store)
    ids = store_ids(store)
    qpath = os.path.join(work, "queries.jsonl")
    rows = make_queries(qpath, ids, n_queries, n_cands)
    pairs = pairs_of(rows)
    found, toks, _, _ = ts.get(sorted({c for _, _, c in pairs}))
    tok_by_id = dict(zip(found, toks))
    texts = [t for _, t, _ in pairs]
    int8_tokens = np.stack([tok_by_id[c] for _, _, c in pairs])
    beam_r, bare_r, bare_rl = [], [], []
    bare_rerank(ckpt, texts[:64], int8_tokens[:64])  # warm-up
    run_rerank(ckpt, qpath, store, os.path.join(work, "scores-warm.parquet"))
    bare_out = {}

    def bare_once(rep):
        r, rl, bare_out["scores"] = bare_rerank(ckpt, texts, int8_tokens)
        bare_r.append(r)
        bare_rl.append(rl)
        log(f"rerank bare score_batch: {r:.1f} pairs/s ({rl:.1f} incl. model load)")

    def beam_rerank_once(rep):
        r, summary = run_rerank(ckpt, qpath, store, os.path.join(work, f"scores-{rep}.parquet"))
        beam_r.append(r)
        log(f"rerank Beam job: {r:.1f} pairs/s, {summary['pairs']} pairs, {summary['failures']} failures")

    alternate(repeats, bare_once, beam_rerank_once)
    bare_scores = bare_out["scores"]
    res.update(rerank_pairs=len(pairs), rerank_beam_pairs_s=[round(x, 1) for x in beam_r],
               rerank_bare_pairs_s=[round(x, 1) for x in bare_r],
               rerank_bare_incl_load_pairs_s=[round(x, 1) for x in bare_rl],
               rerank_ratio=round(max(beam_r) / max(bare_r), 3),
               rerank_ratio_incl_load=round(max(beam_r) / max(bare_rl), 3))
    if n_queries > SMALL_JOB_QUERIES:
        # the job's time = a fixed cost (pipeline, stages, model load) + pairs / its steady rate:
        # a small job's time on top of the large one's separates the two
        small_path = os.path.join(work, "queries-small.jsonl")
        small = rows[:SMALL_JOB_QUERIES]
        with open(small_path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in small))
        small_r = [run_rerank(ckpt, small_path, store, os.path.join(work, f"scores-small-{rep}.parquet"))[0]
                   for rep in range(repeats)]
        p_small, p_large = sum(len(r["candidates"]) for r in small), len(pairs)
        t_small, t_large = p_small / max(small_r), p_large / max(beam_r)
        steady = (p_large - p_small) / max(t_large - t_small, 1e-9)
        res.update(rerank_small_job_pairs=p_small, rerank_small_job_pairs_s=[round(x, 1) for x in small_r],
                   rerank_ratio_small_job=round(max(small_r) / max(bare_r), 3),
                   rerank_job_fixed_seconds=round(t_small - p_small / steady, 3),
                   rerank_job_steady_pairs_s=round(steady, 1),
                   rerank_ratio_steady=round(steady / max(bare_r), 3))
        log(f"rerank Beam job, {p_small} pairs: {max(small_r):.1f} pairs/s; fixed cost "
            f"{res['rerank_job_fixed_seconds']} s, steady {steady:.1f} pairs/s")
    # the Beam job's scores must be the bare ones (same tokens, same model)
    beam_scores = pq.read_table(os.path.join(work, f"scores-{repeats - 1}.parquet")).to_pylist()
    by_pair = {(r["query_id"], r["image_id"]): r["score"] for r in beam_scores}
    res["rerank_beam_vs_bare_max_abs_diff"] = float(max(abs(by_pair[(q, c)] - s)
                                                        for (q, _, c), s in zip(pairs, bare_scores)))

    return pairs, texts, int8_tokens, bare_scores


def report(args, res, goals, tmp):
    """The goals table on stderr, one JSON line on stdout (and --json_out); removes the temp dir."""
    print(f"\n  {'metric':<34} {'value':>10}  goal", file=sys.stderr)
    for k, op, g in goals:
        ok = res[k] >= g if op == ">=" else res[k] <= g
        print(f"  {k:<34} {res[k]:>10}  {op} {g}  {'ok' if ok else 'MISSED'}", file=sys.stderr)
    if "wall_seconds" in res:
        print(f"  {'wall time':<34} {res['wall_seconds']:>10} s\n", file=sys.stderr)
    line = json.dumps(res)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    if tmp is not None:
        tmp.cleanup()
    return res


def rerank_only(args, res, ckpt, pattern, repeats, batch, n_queries, n_cands, work, tmp, started):
    """--only rerank: a faster loop for rerank work; builds (or reuses) the store untimed."""
    store = os.path.join(work, f"store-{repeats - 1}")
    if not os.path.exists(os.path.join(store, "manifest.json")):
        run_precompute(ckpt, pattern, store, batch)
    measure_rerank(res, ckpt, store, work, repeats, n_queries, n_cands)
    res["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report(args, res, [("rerank_ratio", ">=", 0.85)], tmp)


def precision_only(args, res, ckpt, repeats, work, tmp, started, precisions):
    """--only precision / int8: the precisions side by side on the scenes benchmark (bench/precision.py)."""
    from bench.precision import goals, measure
    n = args.n or (200 if args.quick else 800)
    res.update(scenes_n=n, scenes_seed=args.seed)
    measure(res, ckpt, work, n, args.seed, repeats, precisions)
    log(f"cpu: {res['cpu']}")
    for job, pick in res["auto"].items():
        log(f"--precision auto ({job}) picks {pick['precision']}: {pick['why']}")
    res["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report(args, res, goals(res), tmp)


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 shards x 48 images, 2 repeats (<= 15 min)")
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir, removed at the end)")
    ap.add_argument("--json_out", default=None)
    ap.add_argument("--small_store", type=int, default=10_000, help="images in the small synthetic store")
    ap.add_argument("--rows_per_shard", type=int, default=1000, help="rows per synthetic shard")
    ap.add_argument("--only", default="all", choices=["all", "rerank", "precision", "int8"],
                    help="rerank: only rerank_ratio (the store is built once, untimed, or reused from --work); "
                         "precision: fp32, bf16 and int8 side by side on the scenes benchmark "
                         "(bench/precision.py); int8: the same, fp32 and int8 only")
    ap.add_argument("--n", type=int, default=None, help="--only precision: scenes (default 800, 200 with --quick)")
    ap.add_argument("--seed", type=int, default=11, help="--only precision: make_scenes seed")
    ap.add_argument("--checkpoint", default=None,
                    help="measure this checkpoint instead of the random ViT-S one ('default': the embedded demo, "
                         "which --only precision uses unless told)")
    ap.add_argument("--queries", type=int, default=200,
                    help="rerank queries, 20 candidates each (200: 4,000 pairs, the size of ./run_local.sh's "
                         "demo job); a 20-query job also runs, to separate the job's fixed cost")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each side (default 2 quick, 3 full)")
    args = ap.parse_args(argv)
    shards, per_shard, repeats = (4, 48, 2) if args.quick else (8, 64, 3)
    repeats = args.repeats or repeats
    n_queries, n_cands, batch = args.queries, 20, 32
    started = time.perf_counter()
    torch.set_num_threads(1)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="edje-bench-cpu-")
        work = tmp.name
    else:
        work = args.work
        os.makedirs(work, exist_ok=True)
    res = {"quick": args.quick, "rerank_batch_size": 64, "torch_threads": 1, "repeats": repeats}
    if args.only not in ("precision", "int8"):
        res.update(images=shards * per_shard, precompute_batch_size=batch)

    if args.only in ("precision", "int8") and not args.checkpoint:
        args.checkpoint = "default"  # the scenes benchmark's R@1 means something only for a trained model
    if args.checkpoint:
        from models.checkpoint import fingerprint, resolve_dir
        ckpt = str(resolve_dir(None if args.checkpoint == "default" else args.checkpoint))
        fp = fingerprint(ckpt)
    else:
        ckpt = os.path.join(work, "ckpt")
        fp = make_checkpoint(ckpt)
    if args.only in ("precision", "int8"):
        log(f"checkpoint {fp[:12]}")
        precisions = ("fp32", "int8") if args.only == "int8" else ("fp32", "bf16", "int8")
        return precision_only(args, res, ckpt, repeats, work, tmp, started, precisions)
    shard_paths = make_shards(os.path.join(work, "tars"), shards, per_shard)
    pattern = os.path.join(work, "tars", "*.tar")
    log(f"checkpoint {fp[:12]}, {shards} x {per_shard} demo images")

    if args.only == "rerank":
        return rerank_only(args, res, ckpt, pattern, repeats, batch, n_queries, n_cands, work, tmp, started)

    # -- precompute: alternate plain/Beam, best of `repeats`; one untimed warm-up of each first
    plain_rates, plain_load_rates, beam_rates = [], [], []
    plain_precompute(ckpt, shard_paths[:1], batch)
    run_precompute(ckpt, pattern, os.path.join(work, "store-warm"), batch)
    def plain_once(rep):
        r, rl, n = plain_precompute(ckpt, shard_paths, batch)
        plain_rates.append(r)
        plain_load_rates.append(rl)
        log(f"precompute plain loop: {r:.1f} img/s ({rl:.1f} incl. model load), {n} images")

    def beam_once(rep):
        r, summary = run_precompute(ckpt, pattern, os.path.join(work, f"store-{rep}"), batch)
        beam_rates.append(r)
        log(f"precompute Beam job: {r:.1f} img/s, {summary['images']} images, {summary['wall_seconds']} s")

    alternate(repeats, plain_once, beam_once)
    store = os.path.join(work, f"store-{repeats - 1}")
    res.update(precompute_beam_img_s=[round(x, 1) for x in beam_rates],
               precompute_plain_img_s=[round(x, 1) for x in plain_rates],
               precompute_plain_incl_load_img_s=[round(x, 1) for x in plain_load_rates],
               precompute_ratio=round(max(beam_rates) / max(plain_rates), 3),
               precompute_ratio_incl_load=round(max(beam_rates) / max(plain_load_rates), 3))

    # -- token bytes per element, from the real 64x384 store
    from schemas.reader import token_column_bytes_per_element
    from schemas import manifest as mf
    manifest = mf.read(store)
    res["token_bytes_per_element"] = token_column_bytes_per_element(store, manifest)

    # -- rerank: Beam job vs bare score_batch on the same pairs
    pairs, texts, int8_tokens, bare_scores = measure_rerank(res, ckpt, store, work, repeats, n_queries, n_cands)

    # -- Spearman int8 vs fp32
    fp32 = fp32_tokens(ckpt, shard_paths, {c for _, _, c in pairs})
    fp32_tok = np.stack([fp32[c] for _, _, c in pairs])
    _, _, fp32_scores = bare_rerank(ckpt, texts, fp32_tok)
    res.update(agreement(bare_scores, fp32_scores, n_cands, "int8", "score_spearman_per_query"))
    res["score_std_across_pairs"] = float(np.std(fp32_scores))
    rel = np.abs(int8_tokens - fp32_tok).max(-1) / np.abs(fp32_tok).max(-1)
    res["token_max_err_over_absmax"] = float(rel.max())
    log(f"spearman int8 vs fp32: {res['score_spearman_int8_vs_fp32']}")

    # -- int4 store scheme on the same pairs: the encoder's quantize + the readers' decode of fp32 tokens
    from schemas.quantization import INT4, INT8, get_scheme
    int4 = get_scheme(INT4)
    res["int8_bytes_per_image_64x384"] = get_scheme(INT8).row_bytes(64, 384)
    res["int4_bytes_per_image_64x384"] = int4.row_bytes(64, 384)
    m, h = fp32_tok.shape[1:]
    int4_tok = int4.decode(*int4.encode(fp32_tok), m, h)
    _, _, int4_scores = bare_rerank(ckpt, texts, int4_tok)
    res.update(agreement(int4_scores, fp32_scores, n_cands, "int4", "score_spearman_int4_per_query"))
    res["token_rel_l2_err_int4"] = float(np.linalg.norm(int4_tok - fp32_tok) / np.linalg.norm(fp32_tok))
    log(f"spearman int4 vs fp32: {res['score_spearman_int4_vs_fp32']}")

    # -- RSS: same queries against a >=10k and a >=100k store
    t = time.perf_counter()
    model = dict(manifest["model"])
    n_small = max(1, args.small_store // args.rows_per_shard)
    big = os.path.join(work, "store-100k")
    written = write_synthetic_store(big, model, n_small * 10, args.rows_per_shard)
    small = os.path.join(work, "store-10k")
    write_synthetic_store(small, model, n_small, args.rows_per_shard, link_from=written[:n_small])
    log(f"synthetic stores written in {time.perf_counter() - t:.1f} s")
    from schemas.verify import verify
    v = verify(small, check_hash=True)
    res["synthetic_small_store_verify_ok"] = v["ok"]
    # the same measure on incompressible (random) int8 tokens: what a trained model's tokens approach
    res["token_bytes_per_element_random_int8"] = token_column_bytes_per_element(small, mf.read(small))
    res["synthetic_store_rows"] = [n_small * args.rows_per_shard, n_small * 10 * args.rows_per_shard]
    sids = [f"img{i:08d}" for i in range(n_small * args.rows_per_shard)]
    rq = os.path.join(work, "rss-queries.jsonl")
    make_queries(rq, sids, n_queries, n_cands, seed=1)
    rss = {}
    for name, st in (("10k", small), ("100k", big), ("10k_again", small)):
        mib, secs, line = child_rerank_rss_via_getrusage(ckpt, rq, st, os.path.join(work, f"rss-{name}.parquet"))
        rss[name] = (mib, secs)
        log(f"rerank child on {name} store: peak RSS {mib:.0f} MiB, {secs:.1f} s")
    res.update(rerank_peak_rss_mib={k: round(v[0], 1) for k, v in rss.items()},
               rerank_child_seconds={k: round(v[1], 1) for k, v in rss.items()},
               rerank_rss_ratio_10x=round(rss["100k"][0] / max(rss["10k"][0], rss["10k_again"][0]), 3))
    res["wall_seconds"] = round(time.perf_counter() - started, 1)

    goals = [("precompute_ratio", ">=", 0.85), ("rerank_ratio", ">=", 0.85),
             ("token_bytes_per_element", "<=", 1.05), ("score_spearman_int8_vs_fp32", ">=", 0.999),
             ("int4_bytes_per_image_64x384", "<=", 13 * 1024), ("score_spearman_int4_vs_fp32", ">=", 0.995),
             ("rerank_rss_ratio_10x", "<=", 1.2)]
    return report(args, res, goals, tmp)


if __name__ == "__main__":
    main()
