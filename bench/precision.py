"""fp32, bf16 and int8 side by side on this CPU, through the real jobs (``bench.cpu --only precision``).

    HF_HUB_OFFLINE=1 python -m bench.cpu --only precision [--checkpoint default] [--seed S] [--n 800] [--quick]

On ``make_scenes --split test --n N --seed S``: precompute a store at each precision, retrieve the
top 20 per caption from the fp32 store (one candidate list for every arm), then rerank those
candidates at each precision over that precision's own store. One thread, arms in rotating order,
one untimed warm-up of each (it also builds and caches the int8 graphs), best of ``--repeats``.

Per precision:
* ``precompute_{p}_img_s``: the precompute job's images/s (its whole wall time);
* ``rerank_job_{p}_pairs_s`` and ``rerank_bare_{p}_pairs_s``: the rerank job's pairs/s, and the bare
  scorer's (``score_batch``, batch 64, on the same store's tokens, the model already loaded);
* ``*_speedup``: each against fp32 in the same run;
* ``token_cosine_{p}_*``: the store's tokens against the fp32 store's (dequantized, per token);
* ``score_spearman_{p}``: the job's scores (tokens and scores at p) against fp32's, pooled over
  every pair; ``score_spearman_{p}_joint_only``: the bare scorer at p on the fp32 store's tokens;
* ``t2i_r1_{p}``: reranked T2I R@1 (pipeline.evaluate on the job's output); ``t2i_r1_{p}_delta``;
* ``job_vs_api_{p}_max_abs_diff``: the job's score against the bare scorer's for every pair, and the
  same over the fp32 score range (``job_vs_api_{p}_over_range``).
A precision this CPU cannot run (bf16 without bf16 arithmetic, int8 without AVX2 or onnxruntime) is
skipped, with the reason in ``skipped``. ``auto`` says what ``--precision auto`` picks here.
"""
import contextlib
import json
import os
import sys

import numpy as np

from bench.cpu import bare_rerank, log, run_precompute, run_rerank, spearman, store_ids

ORDER = ("fp32", "bf16", "int8")


def rotate(repeats, arms, fn):
    """fn(arm, rep) for every arm, `repeats` times, the order rotating each time (drift cancels)."""
    for rep in range(repeats):
        k = rep % len(arms)
        for arm in arms[k:] + arms[:k]:
            fn(arm, rep)


def available(precisions):
    from models.precision import PrecisionUnavailable, require
    ok, skipped = [], {}
    for p in precisions:
        try:
            require(p, "cpu", gpu_precisions=("fp32", "bf16"))
            ok.append(p)
        except PrecisionUnavailable as e:
            skipped[p] = str(e)
    return ok, skipped


def tokens_of(store, ids):
    from schemas.reader import TokenStore
    found, tokens, _, _ = TokenStore(store).get(ids)
    assert list(found) == list(ids), "store lacks some ids"
    return np.stack(tokens)


def bare_scores(ckpt, precision, texts, tokens):
    """(pairs/s, scores) of the scorer the job loads, on already-read tokens."""
    rate, _, scores = bare_rerank(ckpt, texts, tokens, precision=precision)
    return rate, scores.astype(np.float64)


def job_scores(path, pairs):
    """The rerank job's joint-encoder logit for each (query_id, image_id) of ``pairs``."""
    import pyarrow.parquet as pq
    rows = pq.read_table(path, columns=["query_id", "image_id", "score"]).to_pylist()
    by = {(r["query_id"], r["image_id"]): r["score"] for r in rows}
    return np.array([by[p] for p in pairs], np.float64)


def t2i_r1(candidates, scores_path):
    from evaluation.inputs import load_queries, load_scores
    from evaluation.metrics import evaluate
    queries, _, _ = load_queries(candidates)
    report, _ = evaluate(queries, load_scores(scores_path, queries))
    return report["t2i"]["reranked"]["R@1"]


def measure(res, ckpt, work, n, seed, repeats, precisions=ORDER):
    from models.precision import cpu_info, resolve
    from pipeline import make_scenes, retrieve
    res["cpu"] = cpu_info()
    arms, skipped = available(precisions)
    res.update(precisions=arms, skipped=skipped)
    res["auto"] = {job: dict(zip(("precision", "why"), resolve("auto", "cpu", job))) for job in ("rerank", "precompute")}
    for p, why in skipped.items():
        log(f"{p}: skipped ({why})")
    scenes = os.path.join(work, f"scenes-{n}-{seed}")
    if not os.path.exists(os.path.join(scenes, "queries.jsonl")):
        with contextlib.redirect_stdout(sys.stderr):  # its summary line; stdout is the bench's JSON
            make_scenes.main(["--split", "test", "--n", str(n), "--seed", str(seed), "--per_shard", "200",
                              "--output", scenes])
    pattern = os.path.join(scenes, "*.tar")

    # precompute at each precision
    pre = {p: [] for p in arms}
    for p in arms:
        run_precompute(ckpt, pattern, os.path.join(work, f"store-warm-{p}"), 32, p)

    def precompute_once(p, rep):
        r, summary = run_precompute(ckpt, pattern, os.path.join(work, f"store-{p}-{rep}"), 32, p)
        pre[p].append(r)
        log(f"precompute {p}: {r:.1f} img/s, {summary['images']} images")

    rotate(repeats, arms, precompute_once)
    stores = {p: os.path.join(work, f"store-{p}-{repeats - 1}") for p in arms}
    ids = store_ids(stores["fp32"])
    ref = tokens_of(stores["fp32"], ids)
    ref = ref.reshape(-1, ref.shape[-1])
    for p in arms:
        res[f"precompute_{p}_img_s"] = [round(x, 1) for x in pre[p]]
        res[f"precompute_{p}_speedup"] = round(max(pre[p]) / max(pre["fp32"]), 3)
        if p != "fp32":
            own = tokens_of(stores[p], ids).reshape(ref.shape)
            cos = (own * ref).sum(1) / np.maximum(np.linalg.norm(own, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
            res[f"token_cosine_{p}_mean"] = round(float(cos.mean()), 6)
            res[f"token_cosine_{p}_min"] = round(float(cos.min()), 6)

    # one candidate list, from the fp32 store
    candidates = os.path.join(work, "candidates.jsonl")
    retrieve.run(["--queries", os.path.join(scenes, "queries.jsonl"), "--store", stores["fp32"], "--top_k", "20",
                  "--output", candidates, "--checkpoint", ckpt, "--torch_threads", "1",
                  "--runner=DirectRunner", "--progress=off"])
    queries = [json.loads(line) for line in open(candidates)]
    pairs = [(q["query_id"], c) for q in queries for c in q["candidates"]]
    texts = [q["text"] for q in queries for _ in q["candidates"]]
    pair_ids = [c for _, c in pairs]
    warm = os.path.join(work, "candidates-warm.jsonl")
    with open(warm, "w") as f:
        f.write("".join(json.dumps(q) + "\n" for q in queries[:20]))
    res.update(queries=len(queries), rerank_pairs=len(pairs))

    job = {p: [] for p in arms}
    for p in arms:
        run_rerank(ckpt, warm, stores[p], os.path.join(work, f"scores-warm-{p}.parquet"), p)

    def rerank_once(p, rep):
        r, _ = run_rerank(ckpt, candidates, stores[p], os.path.join(work, f"scores-{p}-{rep}.parquet"), p)
        job[p].append(r)
        log(f"rerank job {p}: {r:.1f} pairs/s, {len(pairs)} pairs")

    rotate(repeats, arms, rerank_once)
    own_tokens = {p: tokens_of(stores[p], pair_ids) for p in arms}
    bare, bare_out = {p: [] for p in arms}, {}
    for p in arms:
        bare_scores(ckpt, p, texts[:64], own_tokens[p][:64])

    def bare_once(p, rep):
        r, bare_out[p] = bare_scores(ckpt, p, texts, own_tokens[p])
        bare[p].append(r)
        log(f"bare scorer {p}: {r:.1f} pairs/s")

    rotate(repeats, arms, bare_once)

    scores = {p: job_scores(os.path.join(work, f"scores-{p}-{repeats - 1}.parquet"), pairs) for p in arms}
    score_range = float(np.ptp(scores["fp32"]))
    res["score_range_fp32"] = round(score_range, 4)
    r1 = {p: t2i_r1(candidates, os.path.join(work, f"scores-{p}-{repeats - 1}.parquet")) for p in arms}
    for p in arms:
        diff = float(np.abs(scores[p] - bare_out[p]).max())
        res.update({f"rerank_job_{p}_pairs_s": [round(x, 1) for x in job[p]],
                    f"rerank_job_{p}_speedup": round(max(job[p]) / max(job["fp32"]), 3),
                    f"rerank_bare_{p}_pairs_s": [round(x, 1) for x in bare[p]],
                    f"rerank_bare_{p}_speedup": round(max(bare[p]) / max(bare["fp32"]), 3),
                    f"rerank_job_over_bare_{p}": round(max(job[p]) / max(bare[p]), 3),
                    f"job_vs_api_{p}_max_abs_diff": diff,
                    f"job_vs_api_{p}_over_range": diff / score_range,
                    f"t2i_r1_{p}": r1[p], f"t2i_r1_{p}_delta": round(r1[p] - r1["fp32"], 2)})
        if p != "fp32":
            _, joint_only = bare_scores(ckpt, p, texts, own_tokens["fp32"])
            res[f"score_spearman_{p}"] = round(spearman(scores[p], scores["fp32"]), 6)
            res[f"score_spearman_{p}_joint_only"] = round(spearman(joint_only, bare_out["fp32"]), 6)
    return res


def goals(res):
    """What issue-level goals read on this CPU: every precision's fidelity; bf16's speed on AMX."""
    out = [("rerank_job_over_bare_fp32", ">=", 0.85)]
    for p in res["precisions"]:
        if p == "fp32":
            out.append(("job_vs_api_fp32_max_abs_diff", "<=", 1e-5))
            continue
        out += [(f"score_spearman_{p}", ">=", 0.999), (f"job_vs_api_{p}_over_range", "<=", 1e-3),
                (f"t2i_r1_{p}_delta", ">=", -0.3)]
    if "bf16" in res["precisions"] and "amx_bf16" in res["cpu"]["flags"]:
        out += [("rerank_job_bf16_speedup", ">=", 2.5), ("precompute_bf16_speedup", ">=", 2.0)]
    return out
