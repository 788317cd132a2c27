"""Every Beam job on a real Flink session cluster on loopback (scripts/flink_local.sh): one
JobManager, two TaskManager JVMs with a Beam worker pool each, Beam's Flink job server. The jobs
get the cluster's flags and nothing else, and give the DirectRunner's bytes and scores, though
one TaskManager is killed with its pool mid-precompute and the rerank then loses the other's
worker pool (the process alone); `down` leaves no process. Needs Java and Maven (the jars are
fetched into a cache on first use); skipped without them, unless EDJE_REQUIRE_FLINK=1 (CI),
which makes that a failure."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import rerank, retrieve
from schemas.verify import verify
from tests.conftest import wait_for_engine_setup
from tests.engines import DIRECT, assert_same_as_direct, retrieve_and_rerank
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
    wait_for_engine_setup("flink")
    c = Cluster(tmp_path_factory.mktemp("flink"))
    c.sh("up", "--taskmanagers", "2")
    c.first_status = c.status()
    yield c
    c.sh("down")


def kill_once_running(cluster, before: set, kill, seconds: float = 5.0) -> str:
    """Waits for a job not in ``before`` to run, lets it run ``seconds``, calls ``kill()``; returns
    the job id. Fails if the job ended before the kill."""
    deadline, jid = time.time() + 300, None
    while time.time() < deadline and jid is None:
        running = [j["jid"] for j in cluster.rest("/jobs/overview")["jobs"]
                   if j["jid"] not in before and j["state"] == "RUNNING"]
        jid = running[0] if running else None
        time.sleep(0.2)
    assert jid, "the job never ran on the cluster"
    time.sleep(seconds)  # its workers are up
    kill()
    state = cluster.rest(f"/jobs/{jid}")["state"]
    assert state not in ("FINISHED", "FAILED", "CANCELED"), f"the job was {state} when killed"
    return jid


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
    """precompute on Flink, one TaskManager and its worker pool killed with -9 mid-job; a rerun
    only if Flink's restarts ran out. -> (store, the job's summary, whether a rerun was needed)."""
    store = tmp_path_factory.mktemp("flink_store") / "store"
    cmd = [sys.executable, "-m", "pipeline.precompute", "--input", f"{demo_dir}/{{00000..00002}}.tar",
           "--output", str(store), *cluster.flags()]
    before = {j["jid"] for j in cluster.rest("/jobs/overview")["jobs"]}
    s = cluster.status()
    tm, pool = s["taskmanagers"][-1], s["worker_pools"][-1]

    def kill():
        os.kill(tm, signal.SIGKILL)
        os.killpg(os.getpgid(pool), signal.SIGKILL)  # the pool, its supervisor and its SDK harnesses
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jid = kill_once_running(cluster, before, kill)
        out, err = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    exceptions = cluster.rest(f"/jobs/{jid}/exceptions")
    assert exceptions.get("exceptionHistory", {}).get("entries"), "the kill did not hit the running job"
    rerun = job.returncode != 0
    if rerun:  # the restarts ran out: the job says so, and a rerun resumes
        assert "error" in err.lower() or "fail" in err.lower()
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    return store, json.loads(out.strip().splitlines()[-1]), rerun


def test_precompute_on_flink_with_a_taskmanager_killed_writes_the_direct_runners_bytes(cluster, flink_store,
                                                                                       demo_store):
    (store, summary, rerun), (ref, ref_summary) = flink_store, demo_store
    assert snapshot(store) == snapshot(ref)  # shard, failure and index bytes; the manifest but its time
    assert verify(str(store))["ok"]
    assert not [p for p in store.rglob("*") if p.name.startswith(".tmp-")]
    if not rerun:
        keep = ("shards", "images", "failures", "duplicates", "shard_bytes", "precision")
        assert {k: summary[k] for k in keep} == {k: ref_summary[k] for k in keep}
    assert len(cluster.status()["taskmanagers"]) == 1


def test_retrieve_and_rerank_on_flink_give_the_direct_runners_candidates_and_scores(
        cluster, flink_store, demo_store, queries, tmp_path):  # noqa: F811
    """And the rerank loses a worker pool (the process alone, as an OOM kill would) mid-job."""
    direct = retrieve_and_rerank(demo_store[0], queries[0], DIRECT, tmp_path, "direct")
    flags, store = cluster.flags(), flink_store[0]
    cands = tmp_path / "flink.jsonl"
    retrieve.run(["--queries", str(queries[0]), "--store", str(store), "--top_k", "5", "--output", str(cands), *flags])
    pools = cluster.status()["worker_pools"]
    before = {j["jid"] for j in cluster.rest("/jobs/overview")["jobs"]}
    with ThreadPoolExecutor(1) as ex:
        killed = ex.submit(kill_once_running, cluster, before, lambda: os.kill(pools[0], signal.SIGKILL))
        scores = tmp_path / "flink.parquet"
        summary = rerank.run(["--queries", str(cands), "--store", str(store), "--output", str(scores), *flags])
        killed.result()
    assert_same_as_direct((cands, scores, summary), direct)
    # the pool's supervisor started a new one on the same address
    after = cluster.status()["worker_pools"]
    assert not alive(pools[0]) and len(after) == len(pools) and all(alive(p) for p in after)


def test_down_leaves_no_process_behind(cluster):
    s = cluster.first_status
    cluster.sh("down")
    pids = [s["jobmanager"], s["job_server"], *s["taskmanagers"], *s["worker_pools"]]
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)]
