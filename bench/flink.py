"""The Beam jobs on Flink against the DirectRunner, side by side on one machine (run by hand).

    HF_HUB_OFFLINE=1 python -m bench.flink [--n 800] [--small 48] [--repeats 1] [--work DIR]

Starts a loopback cluster of its own (scripts/flink_local.sh up, 2 TaskManagers x 2 slots,
parallelism 2), makes scenes test splits of ``--small`` and ``--n`` images, and times each job
as a user's command line sees it (wall time of the launching process), alternating runners:
* the DirectRunner with ``--direct_num_workers=2 --direct_running_mode=multi_processing`` (the
  fastest local setting on 2 cores), and Flink with ``scripts/flink_local.sh flags``;
* precompute at both sizes: img/s of each, and from the two, the job's fixed cost
  (intercept) and its steady img/s (slope);
* retrieve (top 20) and rerank over the small split: their walls are mostly fixed cost.
Every Flink output is checked against the DirectRunner's (shard bytes, candidates, scores).
Prints a table on stderr and one JSON line on stdout.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.precision import cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "flink_local.sh"
DIRECT = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing",
          "--progress=off"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def job(module, *args):
    """Wall seconds of ``python -m pipeline.<module> args``; fails loudly."""
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", f"pipeline.{module}", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{module} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - started


def shard_digest(store: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((store / "shards").glob("*.parquet")) + sorted((store / "index").glob("*")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def lines(path: Path) -> set:
    return set(path.read_text().splitlines())


def scores(path: Path) -> dict:
    import pyarrow.parquet as pq
    t = pq.read_table(path).to_pydict()
    return dict(zip(zip(t["query_id"], t["image_id"]), t["score"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=800, help="images of the large precompute")
    parser.add_argument("--small", type=int, default=48, help="images of the small jobs")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--work", help="work directory (default: a temp dir)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="edje-bench-flink-"))
    env = dict(os.environ, EDJE_FLINK_STATE=str(work / "flink"), EDJE_VENV=str(Path(sys.executable).parent.parent))
    res = {"cpu": cpu_name(), "isa": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))),
           "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "n": args.n, "small": args.small}
    log(f"{res['cpu']}, {res['cores']} cores; work dir {work}")

    splits = {}
    for name, n in (("small", args.small), ("large", args.n)):
        d = work / f"scenes_{name}"
        if not (d / "queries.jsonl").exists():
            job("make_scenes", "--split", "test", "--n", n, "--seed", args.seed, "--per_shard", max(n // 8, 4),
                "--output", d)
        tars = sorted(p.stem for p in d.glob("*.tar"))
        splits[name] = d, f"{d}/{{{tars[0]}..{tars[-1]}}}.tar"

    started = time.perf_counter()
    subprocess.run(["bash", str(SCRIPT), "up", "--taskmanagers", "2"], env=env, check=True, capture_output=True)
    res["flink_up_seconds"] = round(time.perf_counter() - started, 1)
    try:
        flink = subprocess.run(["bash", str(SCRIPT), "flags"], env=env, check=True, capture_output=True,
                               text=True).stdout.split()
        runners = {"direct": DIRECT, "flink": flink}
        walls = {}
        for rep in range(args.repeats):
            for runner, flags in runners.items():
                out = work / f"{runner}{rep}"
                for size in ("small", "large"):
                    store = out / f"store_{size}"
                    t = job("precompute", "--input", splits[size][1], "--output", store, *flags)
                    walls.setdefault((runner, "precompute", size), []).append(t)
                small = out / "store_small"
                cands = out / "candidates.jsonl"
                walls.setdefault((runner, "retrieve", "small"), []).append(
                    job("retrieve", "--queries", splits["small"][0] / "queries.jsonl", "--store", small,
                        "--top_k", 20, "--output", cands, *flags))
                walls.setdefault((runner, "rerank", "small"), []).append(
                    job("rerank", "--queries", cands, "--store", small, "--output", out / "scores.parquet", *flags))
                log(f"  repeat {rep} {runner}: " + ", ".join(f"{k[1]} {k[2]} {v[-1]:.1f} s"
                                                            for k, v in walls.items() if k[0] == runner))
            d, f = work / f"direct{rep}", work / f"flink{rep}"
            same = {"shards_and_index": all(shard_digest(d / s) == shard_digest(f / s)
                                            for s in ("store_small", "store_large")),
                    "candidates": lines(d / "candidates.jsonl") == lines(f / "candidates.jsonl")}
            a, b = scores(d / "scores.parquet"), scores(f / "scores.parquet")
            same["scores_max_abs_diff"] = max(abs(a[k] - b[k]) for k in a) if a.keys() == b.keys() else None
            res.setdefault("flink_equals_direct", []).append(same)
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True)

    for runner in ("direct", "flink"):
        small, large = min(walls[(runner, "precompute", "small")]), min(walls[(runner, "precompute", "large")])
        slope = (large - small) / (args.n - args.small)
        res[runner] = {"precompute_img_per_s": round(args.n / large, 1),
                       "precompute_steady_img_per_s": round(1 / slope, 1) if slope > 0 else None,
                       "precompute_fixed_seconds": round(small - slope * args.small, 1),
                       "retrieve_small_seconds": round(min(walls[(runner, "retrieve", "small")]), 1),
                       "rerank_small_seconds": round(min(walls[(runner, "rerank", "small")]), 1)}
    res["flink_over_direct_precompute_img_per_s"] = round(
        res["flink"]["precompute_img_per_s"] / res["direct"]["precompute_img_per_s"], 3)
    for runner in ("direct", "flink"):
        log(f"{runner:7s} " + "  ".join(f"{k} {v}" for k, v in res[runner].items()))
    log(f"Flink / DirectRunner precompute img/s at n {args.n}: {res['flink_over_direct_precompute_img_per_s']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
