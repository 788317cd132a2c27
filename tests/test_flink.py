"""Every Beam job on a real Flink session cluster on loopback (scripts/flink_local.sh): one
JobManager, two TaskManager JVMs with a Beam worker pool each, Beam's Flink job server. The jobs
get the cluster's flags and nothing else, and give the DirectRunner's bytes and scores; a
TaskManager killed with its pool mid-precompute still gives the clean store; `down` leaves no
process. Needs Java and Maven (the jars are fetched into a cache on first use); skipped without
them, unless EDJE_REQUIRE_FLINK=1 (CI), which makes that a failure."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import precompute, rerank, retrieve, verify
from tests.test_crash_resume import snapshot
from tests.test_rerank import queries  # noqa: F401  (fixture: demo store queries, malformed lines too)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "flink_local.sh"
MISSING = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
if MISSING and os.environ.get("EDJE_REQUIRE_FLINK") == "1":
    raise RuntimeError(f"EDJE_REQUIRE_FLINK=1 but {', '.join(MISSING)} is not on PATH")
pytestmark = [pytest.mark.flink, pytest.mark.slow,
              pytest.mark.skipif(bool(MISSING), reason=f"Flink needs {' and '.join(MISSING)} on PATH")]


class Cluster:
    def __init__(self, state: Path):
        self.env = dict(os.environ, EDJE_FLINK_STATE=str(state), EDJE_VENV=str(Path(sys.executable).parent.parent))

    def sh(self, *args, timeout=900) -> str:
        r = subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"flink_local.sh {' '.join(args)} failed:\n{r.stderr[-3000:]}"
        return r.stdout

    def status(self) -> dict:
        return json.loads(self.sh("status"))

    def flags(self) -> list:
        return self.sh("flags").split()

    def rest(self, path: str):
        with urllib.request.urlopen(f"http://{self.status()['flink_master']}{path}", timeout=10) as r:
            return json.load(r)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("flink"))
    c.sh("up", "--taskmanagers", "2")
    c.first_status = c.status()
    yield c
    c.sh("down")


def by_line(path: Path) -> set:
    return set(path.read_text().splitlines())


def scores_by_pair(path):
    t = pq.read_table(path).to_pydict()
    return {(q, i): (r, s) for q, i, r, s in zip(t["query_id"], t["image_id"], t["rank"], t["score"])}


def test_status_lists_a_jobmanager_two_taskmanagers_and_their_pools(cluster):
    s = cluster.first_status
    assert len(s["taskmanagers"]) == 2 and len(s["worker_pools"]) == 2
    assert all(alive(p) for p in [s["jobmanager"], s["job_server"], *s["taskmanagers"], *s["worker_pools"]])
    overview = cluster.rest("/overview")
    assert overview["taskmanagers"] == 2 and overview["slots-total"] == 4
    flags = cluster.flags()
    assert "--runner=FlinkRunner" in flags and "--environment_type=EXTERNAL" in flags


@pytest.fixture(scope="module")
def flink_store(cluster, demo_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("flink_store") / "store"
    summary = precompute.run(["--input", f"{demo_dir}/{{00000..00002}}.tar", "--output", str(store),
                              *cluster.flags()])
    return store, summary


def test_precompute_on_flink_writes_the_direct_runners_bytes(flink_store, demo_store):
    (store, summary), (ref, ref_summary) = flink_store, demo_store
    assert snapshot(store) == snapshot(ref)  # shard, failure and index bytes; the manifest but its time
    assert verify.verify(str(store))["ok"]
    keep = ("shards", "images", "failures", "duplicates", "shard_bytes", "precision")
    assert {k: summary[k] for k in keep} == {k: ref_summary[k] for k in keep}


def test_retrieve_and_rerank_on_flink_give_the_direct_runners_candidates_and_scores(
        cluster, flink_store, demo_store, queries, tmp_path):  # noqa: F811
    out = {}
    for name, store, flags in (("flink", flink_store[0], cluster.flags()),
                               ("direct", demo_store[0], ["--runner=DirectRunner", "--progress=off"])):
        cands = tmp_path / f"{name}.jsonl"
        retrieve.run(["--queries", str(queries[0]), "--store", str(store), "--top_k", "5",
                      "--output", str(cands), *flags])
        scores = tmp_path / f"{name}.parquet"
        summary = rerank.run(["--queries", str(cands), "--store", str(store), "--output", str(scores), *flags])
        out[name] = cands, scores, summary
    (fc, fs, fsum), (dc, ds, dsum) = out["flink"], out["direct"]
    # the same lines (a file's line order follows the runner's; rows are keyed by query_id)
    assert by_line(fc) == by_line(dc) and len(by_line(dc)) == len(fc.read_text().splitlines())
    assert by_line(Path(str(fc).replace(".jsonl", ".failures.jsonl"))) == \
        by_line(Path(str(dc).replace(".jsonl", ".failures.jsonl")))
    flink_scores, direct_scores = scores_by_pair(fs), scores_by_pair(ds)
    assert flink_scores.keys() == direct_scores.keys() and len(flink_scores) > 0
    assert max(abs(flink_scores[k][1] - direct_scores[k][1]) for k in direct_scores) <= 1e-6
    assert all(flink_scores[k][0] == direct_scores[k][0] for k in direct_scores)
    assert {k: fsum[k] for k in ("queries_scored", "pairs", "failures")} == \
        {k: dsum[k] for k in ("queries_scored", "pairs", "failures")}


def test_a_taskmanager_killed_mid_precompute_still_gives_the_clean_store(cluster, demo_dir, demo_store, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "pipeline.precompute", "--input", f"{demo_dir}/{{00000..00002}}.tar",
           "--output", str(store), *cluster.flags()]
    before = {j["jid"] for j in cluster.rest("/jobs/overview")["jobs"]}
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        jid = None
        while time.time() < deadline and job.poll() is None and jid is None:
            running = [j["jid"] for j in cluster.rest("/jobs/overview")["jobs"]
                       if j["jid"] not in before and j["state"] == "RUNNING"]
            jid = running[0] if running else None
            time.sleep(0.2)
        assert jid, "the job never ran on the cluster"
        time.sleep(5)  # its workers are up and encoding
        s = cluster.status()
        tm, pool = s["taskmanagers"][-1], s["worker_pools"][-1]
        os.kill(tm, signal.SIGKILL)
        os.killpg(os.getpgid(pool), signal.SIGKILL)  # the pool, its supervisor and its SDK harnesses
        _, err = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    exceptions = cluster.rest(f"/jobs/{jid}/exceptions")
    assert exceptions.get("exceptionHistory", {}).get("entries"), "the kill did not hit the running job"
    if job.returncode != 0:  # the restarts ran out: a rerun resumes
        assert "error" in err.lower() or "fail" in err.lower()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert snapshot(store) == snapshot(demo_store[0])
    assert verify.verify(str(store))["ok"]
    assert not [p for p in store.rglob("*") if p.name.startswith(".tmp-")]
    assert len(cluster.status()["taskmanagers"]) == 1


def test_down_leaves_no_process_behind(cluster):
    s = cluster.first_status
    cluster.sh("down")
    pids = [s["jobmanager"], s["job_server"], *s["taskmanagers"], *s["worker_pools"]]
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)]
