"""The jobs as a user runs them: subprocesses, exit codes, JSON on stdout."""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from schemas import manifest as mf
from tests.conftest import run_precompute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture
def store_copy(demo_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(demo_store[0], dst)
    return dst


def test_verify_passes_a_clean_store(store_copy):
    r = job("pipeline.verify", "--store", str(store_copy))
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"] is True
    assert report["rows"] == report["unique_ids"] == 24 and report["duplicates"] == 0
    assert report["commit"] == 1 and report["notes"] == []
    assert r.stderr == ""  # no Beam notice about apitools/BigQuery, nor anything else


def test_every_job_documents_the_object_store_flags(capsys):
    import importlib
    for name, entry in (("precompute", "run"), ("retrieve", "run"), ("rerank", "run"), ("verify", "main"),
                        ("evaluate", "run"), ("make_scenes", "main"), ("train", "parse_args")):
        with pytest.raises(SystemExit) if entry != "run" or name == "evaluate" else contextlib.nullcontext():
            getattr(importlib.import_module(f"pipeline.{name}"), entry)(["--help"])
        out = capsys.readouterr().out
        assert "--s3_endpoint_url" in out and "--s3_secret_access_key" in out and "--project" in out, name


def test_verify_names_the_shard_with_a_flipped_byte(store_copy):
    path = store_copy / "shards" / "00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    r = job("pipeline.verify", "--store", str(store_copy))
    report = json.loads(r.stdout)
    assert r.returncode == 1 and not report["ok"]
    assert {p["shard"] for p in report["problems"]} == {"00001"}
    # Without hashing, the Parquet page checksums still catch it.
    report = json.loads(job("pipeline.verify", "--store", str(store_copy), "--no_hash").stdout)
    assert not report["ok"] and report["problems"][0]["shard"] == "00001"


def test_verify_catches_missing_extra_and_miscounted_shards(store_copy):
    (store_copy / "shards" / "00002.parquet").unlink()
    shutil.copy(store_copy / "shards" / "00000.parquet", store_copy / "shards" / "zz-extra.parquet")
    m = json.loads((store_copy / "manifest.json").read_text())
    m["shards"][0]["rows"] += 1
    m["totals"]["rows"] += 1
    (store_copy / "manifest.json").write_text(json.dumps(m))
    report = json.loads(job("pipeline.verify", "--store", str(store_copy)).stdout)
    named = {p["shard"] for p in report["problems"]}
    assert not report["ok"] and {"00000", "00002", "zz-extra.parquet"} <= named


def test_verify_catches_ids_served_twice(store_copy):
    m = json.loads((store_copy / "manifest.json").read_text())
    shutil.copy(store_copy / "shards" / "00000.parquet", store_copy / "shards" / "copy.parquet")
    m["shards"].append(dict(m["shards"][0], name="copy", path="shards/copy.parquet"))
    m["totals"]["rows"] += m["shards"][0]["rows"]
    (store_copy / "manifest.json").write_text(json.dumps(m))
    report = json.loads(job("pipeline.verify", "--store", str(store_copy)).stdout)
    assert not report["ok"] and any("also served" in p["problem"] for p in report["problems"])


def test_readers_refuse_a_manifest_that_does_not_validate(store_copy):
    m = json.loads((store_copy / "manifest.json").read_text())
    m["shards"][0]["path"] = "../../etc/passwd"
    (store_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(mf.ManifestError, match="inside the store"):
        mf.read(str(store_copy))
    r = job("pipeline.verify", "--store", str(store_copy))
    assert r.returncode == 1


@pytest.mark.slow
def test_multi_processing_writes_byte_identical_shards(demo_dir, demo_store, tmp_path):
    store = tmp_path / "mp"
    run_precompute(f"{demo_dir}/{{00000..00002}}.tar", store,
                   "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    a, b = mf.read(str(demo_store[0])), mf.read(str(store))
    assert [(s["name"], s["sha256"]) for s in a["shards"]] == [(s["name"], s["sha256"]) for s in b["shards"]]
    assert [f["sha256"] for f in a["index"]["files"]] == [f["sha256"] for f in b["index"]["files"]]


@pytest.mark.slow
def test_precompute_command_line_end_to_end(demo_dir, tmp_path):
    store = tmp_path / "cli"
    r = job("pipeline.precompute", "--runner=DirectRunner", "--progress=off",
            "--input", f"{demo_dir}/{{00000..00002}}.tar", "--output", str(store))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["images"] == 24 and summary["shards"] == 3 and summary["failures"] == 0
    assert job("pipeline.verify", "--store", str(store)).returncode == 0
