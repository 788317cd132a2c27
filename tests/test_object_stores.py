"""The whole chain with inputs, store and outputs on object stores: moto's S3 server and the GCS
emulator, real servers on loopback started by the fixtures. Both also get multi_processing
workers and a flipped byte; S3 gets kill -9 and rerun, a second writer and the Python API."""
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import demo_members, second_while_first_paused, tar_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = 3
PER_SHARD = 8
pytestmark = pytest.mark.slow


def upload_img2dataset_shards(store, prefix="shards"):
    """img2dataset's layout: NNNNN.tar (key.jpg/.txt/.json) with its .parquet and _stats.json side
    files; shard 1 holds one undecodable image. Returns (queries file URL, successful sample ids)."""
    good, queries = [], []
    for s in range(SHARDS):
        members = demo_members(s, PER_SHARD)
        if s == 1:
            members.append(("000019999.jpg", b"\xff\xd8 not a jpeg"))
            members.append(("000019999.txt", b"a broken download"))
        store.put(f"{prefix}/{s:05d}.tar", tar_bytes(members))
        store.put(f"{prefix}/{s:05d}_stats.json", json.dumps({"count": PER_SHARD}).encode())
        store.put(f"{prefix}/{s:05d}.parquet", b"PAR1 side file, not a shard")
        keys = sorted({name.split(".")[0] for name, _ in members if name.endswith(".txt")} - {"000019999"})
        good += keys
        queries += [{"query_id": f"q{k}", "text": text.decode(), "relevant": [k]}
                    for k, text in ((n.split(".")[0], d) for n, d in members if n.endswith(".txt"))
                    if k in keys]
    store.put(f"{prefix}/queries.jsonl", "".join(json.dumps(q) + "\n" for q in queries).encode())
    return store.url(f"{prefix}/queries.jsonl"), sorted(good)


def job(store, *args, check=True, flags=True, env=None):
    """A job as a command: its own process, exit status, stdout and stderr."""
    env = {**os.environ, **store.env, **(env or {})}
    r = subprocess.run([sys.executable, "-m", *args, *(store.flags if flags else [])], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert "apitools" not in r.stdout + r.stderr
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def job_here(capsys, store, module, *args):
    """The same job through its main() in this process (no interpreter start-up to pay); it must
    succeed. -> (stdout, stderr)."""
    capsys.readouterr()
    try:
        code = importlib.import_module(module).main([*args, *store.flags])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code in (None, 0), err[-3000:]
    return out, err


def precompute_args(store, key="store", *extra):
    return ("pipeline.precompute", "--runner=DirectRunner", "--progress=off",
            "--input", store.url("shards/{00000..00002}.tar"), "--output", store.url(key), *extra)


def stored_ids(store, key="store"):
    ids = []
    for k in store.keys(f"{key}/shards/"):
        ids += pq.read_table(io.BytesIO(store.get(k)), columns=["image_id"]).column(0).to_pylist()
    return sorted(ids)


def chain(store, capsys):
    queries, good = upload_img2dataset_shards(store)
    job_here(capsys, store, *precompute_args(store))
    report = json.loads(job_here(capsys, store, "pipeline.verify", "--store", store.url("store"))[0])
    assert report["ok"] and report["rows"] == len(good) and report["commit"] == 1
    assert stored_ids(store) == good
    _, err = job_here(capsys, store, "pipeline.retrieve", "--runner=DirectRunner", "--queries", queries, "--store",
                      store.url("store"), "--top_k", "5", "--output", store.url("out/candidates.jsonl"))
    assert "retrieve: 100%" in err  # the progress bar, local runner
    out, err = job_here(capsys, store, "pipeline.rerank", "--runner=DirectRunner", "--queries",
                        store.url("out/candidates.jsonl"), "--store", store.url("store"),
                        "--output", store.url("out/scores.parquet"))
    assert "rerank: 100%" in err
    assert json.loads(out.strip().splitlines()[-1])["pairs"] == 5 * len(good)
    job_here(capsys, store, "pipeline.evaluate", "--queries", store.url("out/candidates.jsonl"), "--scores",
        store.url("out/scores.parquet"), "--output", store.url("out/report"),
        "--images", store.url("shards/{00000..00002}.tar"), "--strips", "2")
    keys = set(store.keys())
    for key in ("store/manifest.json", "store/manifests/0000000001.json", "out/candidates.failures.jsonl",
                "out/scores.failures.jsonl", "out/report/report.json", "out/report/report.md",
                "out/report/recall_at_k.png"):
        assert key in keys, key
    assert len([k for k in keys if k.startswith("out/report/strips/")]) == 2
    assert not [k for k in keys if "/.tmp-" in k] and "store/lease.json" not in keys
    report = json.loads(store.get("out/report/report.json"))
    assert report["counts"]["queries"] == len(good)
    assert store.get("out/scores.failures.jsonl") == b""  # an empty object is written on S3 too
    return good


@pytest.fixture(params=["s3", "gcs"])
def bucket(request):
    return request.getfixturevalue(request.param)


def test_the_whole_chain_on_an_object_store(bucket, capsys):
    """The chain; then multi_processing workers write the same store; then a flipped byte (these
    two as commands of their own)."""
    good = chain(bucket, capsys)
    job(bucket, *precompute_args(bucket, "mp", "--direct_num_workers=2", "--direct_running_mode=multi_processing"))
    a, b = snapshot(bucket, "store"), snapshot(bucket, "mp")
    assert a[1] == b[1]
    assert [s["sha256"] for s in a[0]["shards"]] == [s["sha256"] for s in b[0]["shards"]]
    if bucket.scheme == "s3":
        from models.reranker import Reranker
        rr = Reranker(bucket.url("store"), filesystem_options=bucket.options)
        ranked = rr.rank("a photo", good[:4], top_k=2)
        assert len(ranked) == 2 and {r["image_id"] for r in ranked} <= set(good[:4])
    flipped_byte_is_named_by_verify(bucket)


def flipped_byte_is_named_by_verify(bucket):
    key = "store/shards/00001.parquet"
    data = bytearray(bucket.get(key))
    data[len(data) // 2] ^= 0x01
    bucket.put(key, bytes(data))
    env = {}
    if bucket.scheme == "s3":  # no --s3_* flags this time: boto3's own environment reaches the store too
        env = {"AWS_ENDPOINT_URL": bucket.endpoint, "AWS_ACCESS_KEY_ID": bucket.options["s3_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": bucket.options["s3_secret_access_key"],
               "AWS_DEFAULT_REGION": bucket.options["s3_region_name"]}
    r = job(bucket, "pipeline.verify", "--store", bucket.url("store"), check=False, flags=False, env=env)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert any(p["shard"] == "00001" and "sha256" in p["problem"] for p in report["problems"])


def snapshot(store, key):
    manifest = json.loads(store.get(f"{key}/manifest.json"))
    manifest.pop("created_at")
    files = {k[len(key) + 1:]: store.get(k) for k in store.keys(f"{key}/")
             if k.split("/")[len(key.split("/"))] in ("shards", "failures", "index")}
    return manifest, files


def test_kill_9_mid_precompute_then_rerun_gives_the_clean_store(s3, capsys):
    upload_img2dataset_shards(s3)
    job_here(capsys, s3, *precompute_args(s3, "clean", "--batch_size", "4"))
    cmd = [sys.executable, "-m", *precompute_args(s3, "killed", "--batch_size", "4"), *s3.flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not s3.keys("killed/stats/"):
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "killed/manifest.json" not in s3.keys("killed/")
    assert "killed/lease.json" in s3.keys("killed/")  # the dead job's lease: broken by the rerun at once
    job_here(capsys, s3, *precompute_args(s3, "killed", "--batch_size", "4"))
    assert snapshot(s3, "killed") == snapshot(s3, "clean")
    leftover = [k for k in s3.keys("killed/") if "/.tmp-" in k or k.endswith("lease.json")]
    assert leftover == []
    assert json.loads(job_here(capsys, s3, "pipeline.verify", "--store", s3.url("killed"))[0])["ok"]


def test_a_second_writer_is_refused_and_the_store_stays_valid(s3):
    upload_img2dataset_shards(s3)
    cmd = [sys.executable, "-m", *precompute_args(s3), *s3.flags]
    second, code, err = second_while_first_paused(
        cmd, lambda: "store/lease.json" in s3.keys("store/"),
        lambda: job(s3, *precompute_args(s3), check=False), ROOT)
    assert second.returncode != 0
    assert "is being written by precompute" in second.stderr, second.stderr[-2000:]
    assert code == 0, err[-3000:]
    report = json.loads(job(s3, "pipeline.verify", "--store", s3.url("store")).stdout)
    assert report["ok"] and report["commit"] == 1 and report["notes"] == []
    assert "store/lease.json" not in s3.keys("store/")


def test_make_scenes_writes_to_s3_and_training_reads_from_it(s3, tmp_path):
    """The same bytes as a local run; pipeline.train's loader reads the shards back from S3."""
    from pipeline import make_scenes
    from training.scenes import load_scenes
    args = ["--split", "test", "--n", "8", "--seed", "5", "--per_shard", "4"]
    make_scenes.main([*args, "--output", str(tmp_path / "local")])
    make_scenes.main([*args, "--output", s3.url("scenes"), *s3.flags])
    assert s3.keys("scenes/") == ["scenes/00000.tar", "scenes/00001.tar", "scenes/queries.jsonl"]
    for name in ("00000.tar", "00001.tar", "queries.jsonl"):
        assert s3.get(f"scenes/{name}") == (tmp_path / "local" / name).read_bytes()
    local = load_scenes(str(tmp_path / "local" / "*.tar"), lambda image: torch.zeros(1))
    remote = load_scenes(s3.url("scenes/{00000..00001}.tar"), lambda image: torch.zeros(1))
    assert remote["keys"] == local["keys"] and remote["captions"] == local["captions"]
    assert remote["relevant"] == local["relevant"]


def test_beam_s3_calls_share_one_boto3_client_and_readers_stay_apart(s3):
    """schemas/s3_clients.py: Beam builds a client wrapper per call; they share the boto3 client of
    their options (another endpoint gets its own), and two files read at once stay apart."""
    from apache_beam.io.aws import s3io
    from apache_beam.io.filesystems import FileSystems
    from schemas import storage
    storage.set_filesystem_options(s3.options)
    a, b = s3io.S3IO(options=s3.options), s3io.S3IO(options=s3.options)
    other = s3io.S3IO(options={**s3.options, "s3_endpoint_url": s3.endpoint.replace("127.0.0.1", "localhost")})
    assert a.client.client is b.client.client and a.client is not b.client
    assert other.client.client is not a.client.client
    s3.put("x", bytes(range(256)) * 400)
    s3.put("y", bytes(reversed(range(256))) * 400)
    fx, fy = FileSystems.open(s3.url("x")), FileSystems.open(s3.url("y"))
    parts = [(fx.read(1000), fy.read(3000)) for _ in range(20)]
    assert b"".join(p[0] for p in parts) + fx.read() == s3.get("x")
    assert b"".join(p[1] for p in parts) + fy.read() == s3.get("y")
