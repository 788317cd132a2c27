"""Peak memory of streamed training against corpus size: the same run on N and 10 x N shards.

    HF_HUB_OFFLINE=1 python -m bench.train_memory [--shards 4 --per_shard 24 --steps 40]

Writes real-photo shards (``pipeline.make_demo_shards``) and a random-weights backbone
(``models.make_default``), runs ``pipeline.train --stage edje`` (streaming, 2 DataLoader workers)
on the small and the 10x corpus in turn, sampling the summed RSS of the trainer and its worker
processes (``/proc``) every 0.1 s. Prints one JSON line: peak MiB each, their ratio.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except OSError:
                pass
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


def peak_rss(cmd, env) -> int:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"training failed ({proc.returncode}): {' '.join(cmd)}")
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per_shard", type=int, default=24)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([py, "-m", "models.make_default", "--output", str(tmp / "backbone")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        out = {}
        for name, n in (("small", args.shards), ("large", 10 * args.shards)):
            subprocess.run([py, "-m", "pipeline.make_demo_shards", "--output", str(tmp / name), "--shards", str(n),
                            "--per_shard", str(args.per_shard)], env=env, check=True, stdout=subprocess.DEVNULL)
            cmd = [py, "-m", "pipeline.train", "--stage", "edje", "--data", f"{tmp / name}/*.tar",
                   "--backbone", str(tmp / "backbone"), "--output", str(tmp / f"run-{name}"), "--device", "cpu",
                   "--batch_size_edje", "16", "--joint_layers", "2", "--num_tokens", "8", "--workers", "2",
                   "--max_steps_edje", str(args.steps), "--eval_every", str(args.steps), "--max_minutes_edje", "30"]
            out[name] = {"shards": n, "samples": n * args.per_shard, "peak_rss_mib": round(peak_rss(cmd, env) / 2**20, 1)}
        out["ratio_large_over_small"] = round(out["large"]["peak_rss_mib"] / out["small"]["peak_rss_mib"], 3)
        out["steps"], out["batch"] = args.steps, 16
    print(json.dumps(out))


if __name__ == "__main__":
    main()
