"""bf16 arms on the CPU: how to run a model in bf16, side by side with fp32 (run by hand).

    HF_HUB_OFFLINE=1 python -m bench.bf16_arms --scenes DIR --candidates CANDS.jsonl --store STORE [--checkpoint DIR]

DIR: ``make_scenes --split test`` output; CANDS: the retrieve job's top 20 over STORE (an fp32 store).
One thread, alternating arms, best of ``--repeats``. Arms:

* joint encoder, on STORE's tokens: fp32 ``FastScorer``; ``cast``: the module in bf16
  (``.to(torch.bfloat16)``, every op in bf16); ``autocast``: fp32 weights under
  ``torch.autocast("cpu", torch.bfloat16)`` (GEMMs in bf16, LayerNorm and softmax in fp32).
  pairs/s of ``score_batch`` (batch 64), Spearman and max |Δ| against fp32, fused T2I R@1.
* vision encoder (backbone + adapter), on the scenes' images: the same three; img/s (batch 32),
  token and embedding cosine against fp32, and the fp32 joint encoder's fused T2I R@1 on each arm's
  int8-quantized tokens (the store's scheme).

Prints the CPU and one JSON line.
"""
import argparse
import contextlib
import copy
import json
import time

import numpy as np
import torch

from bench.cpu import log, spearman
from models.precision import cpu_info

ARMS = ("fp32", "cast", "autocast")


def arm_context(arm):
    return torch.autocast("cpu", dtype=torch.bfloat16) if arm == "autocast" else contextlib.nullcontext()


def arm_model(model, arm):
    return copy.deepcopy(model).to(torch.bfloat16) if arm == "cast" else model


def timed(fn, n, seconds=2.0):
    best, t0 = 0.0, time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t))
        if time.perf_counter() - t0 > seconds:
            return best


def t2i_r1(queries, scores, weight):
    """Fused T2I R@1: the best of logit + weight * first-stage score among each query's candidates."""
    hits, k = 0, 0
    for q in queries:
        n = len(q["candidates"])
        key = scores[k:k + n] + weight * np.array(q["candidate_scores"])
        hits += q["candidates"][int(np.argmax(key))] in set(q["relevant"])
        k += n
    return 100.0 * hits / len(queries)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", required=True)
    ap.add_argument("--candidates", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    from models.checkpoint import load_scorer, load_vision_encoder
    from models.joint_encoder import score_batch
    from schemas.quantization import dequantize_int8, quantize_int8
    from schemas.reader import TokenStore
    from transforms.image_decode import decode_image
    from transforms.tar_samples import iter_samples
    torch.set_num_threads(1)
    res = {"cpu": cpu_info()}
    queries = [json.loads(line) for line in open(args.candidates)]
    pairs = [(q["text"], c) for q in queries for c in q["candidates"]]
    scorer, tok, cfg, _ = load_scorer(args.checkpoint)
    weight = cfg.joint_encoder.fusion_weight or 0.0
    ids = sorted({c for _, c in pairs})
    found, tokens, _, _ = TokenStore(args.store).get(ids)
    by_id = dict(zip(found, tokens))
    texts = [t for t, _ in pairs]

    def score_all(model, arm, token_of):
        out = []
        with torch.inference_mode(), arm_context(arm):
            for i in range(0, len(pairs), 64):
                out.append(score_batch(model, tok, texts[i:i + 64], np.stack([token_of[c] for _, c in pairs[i:i + 64]])))
        return np.concatenate(out).astype(np.float64)

    # joint encoder arms
    models = {arm: arm_model(scorer, arm) for arm in ARMS}
    scores = {arm: score_all(models[arm], arm, by_id) for arm in ARMS}
    batch_texts, batch_tokens = texts[:64], np.stack([by_id[c] for _, c in pairs[:64]])
    speed = {arm: [] for arm in ARMS}

    def joint_once(arm):
        def once(rep):
            def fn():
                with torch.inference_mode(), arm_context(arm):
                    score_batch(models[arm], tok, batch_texts, batch_tokens)
            speed[arm].append(timed(fn, 64))
            log(f"joint {arm}: {speed[arm][-1]:.1f} pairs/s")
        return once

    for rep in range(args.repeats):
        for arm in (ARMS if rep % 2 == 0 else ARMS[::-1]):
            joint_once(arm)(rep)
    for arm in ARMS:
        res[f"joint_{arm}_pairs_s"] = round(max(speed[arm]), 1)
        res[f"joint_{arm}_speedup"] = round(max(speed[arm]) / max(speed["fp32"]), 3)
        res[f"joint_{arm}_spearman"] = round(spearman(scores[arm], scores["fp32"]), 6)
        res[f"joint_{arm}_max_abs_diff"] = round(float(np.abs(scores[arm] - scores["fp32"]).max()), 5)
        res[f"joint_{arm}_t2i_r1"] = round(t2i_r1(queries, scores[arm], weight), 2)
    res["joint_score_range"] = round(float(np.ptp(scores["fp32"])), 3)

    # vision encoder arms
    encoder, _, _ = load_vision_encoder(args.checkpoint)
    transform = encoder.backbone.image_transform()
    import glob
    images, keys = [], []
    for path in sorted(glob.glob(f"{args.scenes}/*.tar")):
        with open(path, "rb") as f:
            for s in iter_samples(f):
                keys.append(s.key)
                images.append(transform(decode_image(s.members[s.image_extension()])))
    images = torch.stack(images)
    encoders = {arm: arm_model(encoder, arm) for arm in ARMS}

    def encode(arm, x):
        with torch.inference_mode(), arm_context(arm):
            t, e = encoders[arm](x.to(torch.bfloat16) if arm == "cast" else x)
        return t.float().numpy(), e.float().numpy()

    out = {arm: [encode(arm, images[i:i + 32]) for i in range(0, len(images), 32)] for arm in ARMS}
    toks = {arm: np.concatenate([t for t, _ in out[arm]]) for arm in ARMS}
    embs = {arm: np.concatenate([e for _, e in out[arm]]) for arm in ARMS}
    vspeed = {arm: [] for arm in ARMS}
    for rep in range(args.repeats):
        for arm in (ARMS if rep % 2 == 0 else ARMS[::-1]):
            vspeed[arm].append(timed(lambda: encode(arm, images[:32]), 32))
            log(f"vision {arm}: {vspeed[arm][-1]:.1f} img/s")
    for arm in ARMS:
        a, b = toks["fp32"].reshape(-1, toks["fp32"].shape[-1]), toks[arm].reshape(-1, toks[arm].shape[-1])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        ecos = (embs["fp32"] * embs[arm]).sum(1)
        q, s = quantize_int8(toks[arm])
        stored = dict(zip(keys, dequantize_int8(q, s)))
        arm_scores = score_all(scorer, "fp32", stored)
        res.update({f"vision_{arm}_img_s": round(max(vspeed[arm]), 1),
                    f"vision_{arm}_speedup": round(max(vspeed[arm]) / max(vspeed["fp32"]), 3),
                    f"vision_{arm}_token_cos_mean": round(float(cos.mean()), 6),
                    f"vision_{arm}_token_cos_min": round(float(cos.min()), 6),
                    f"vision_{arm}_embedding_cos_min": round(float(ecos.min()), 6),
                    f"vision_{arm}_t2i_r1": round(t2i_r1(queries, arm_scores, weight), 2)})
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
