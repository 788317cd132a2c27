"""Fault injection: a real precompute process killed with SIGKILL, then rerun."""
import os
import signal
import subprocess
import sys
import time

import pytest

from schemas import manifest as mf
from tests.conftest import demo_members, run_precompute, write_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash_in")
    for s in range(5):
        members = demo_members(s, 12)
        if s == 2:
            members += [("bad.jpg", b"not an image"), (members[0][0], members[0][1])]  # a failure and a duplicate
        write_tar(d / f"{s:05d}.tar", members)
    (d / "00005.tar").write_bytes(b"not a tar at all" * 100)
    return d


def snapshot(store):
    """Everything that must be identical: file bytes under shards/failures/index, manifest minus time."""
    m = mf.read(str(store))
    m.pop("created_at")
    files = {}
    for sub in ("shards", "failures", "index"):
        for p in sorted((store / sub).iterdir()) if (store / sub).exists() else []:
            files[f"{sub}/{p.name}"] = p.read_bytes()
    return m, files


def kill_when(cmd, store, ready, timeout=120):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready(store):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


def mid_write(store):
    d = store / "shards"
    return d.exists() and any(p.name.startswith(".tmp-") for p in d.iterdir())


def after_first_commit(store):
    d = store / "stats"
    return d.exists() and any(p.suffix == ".json" for p in d.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("ready", [mid_write, after_first_commit], ids=["mid-write", "after-commit"])
def test_kill_9_then_rerun_gives_the_clean_store(shards, tmp_path, ready):
    pattern = f"{shards}/*.tar"
    clean = tmp_path / "clean"
    run_precompute(pattern, clean, "--batch_size", "4")
    store = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.precompute", "--runner=DirectRunner", "--progress=off",
           "--input", pattern, "--output", str(store), "--batch_size", "4"]
    assert kill_when(cmd, store, ready), "the job finished before it could be killed"
    assert not (store / "manifest.json").exists()
    run_precompute(pattern, store, "--batch_size", "4")
    assert snapshot(store) == snapshot(clean)
    listed = {s["path"].split("/")[1] for s in mf.read(str(store))["shards"]}
    assert {p.name for p in (store / "shards").iterdir()} == listed  # no debris
