"""Every Beam job on Beam's Prism runner (scripts/prism.sh builds it from Go at the SDK's version):
a second portable engine beside Flink, on loopback. precompute gives the DirectRunner's bytes,
retrieve and rerank its candidates and scores, with Prism's flags and nothing else changed. Needs
Go (the build is cached); skipped without it, unless EDJE_REQUIRE_PRISM=1 (CI)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import precompute
from schemas.verify import verify
from tests.conftest import wait_for_engine_setup
from tests.engines import DIRECT, assert_same_as_direct, retrieve_and_rerank
from tests.test_crash_resume import snapshot
from tests.test_rerank import queries  # noqa: F401  (fixture: demo store queries, malformed lines too)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prism.sh"
HAVE_GO = shutil.which("go") is not None
if not HAVE_GO and os.environ.get("EDJE_REQUIRE_PRISM") == "1":
    raise RuntimeError("EDJE_REQUIRE_PRISM=1 but go is not on PATH")
pytestmark = [pytest.mark.prism, pytest.mark.slow,
              pytest.mark.skipif(not HAVE_GO, reason="building Prism needs go on PATH")]


@pytest.fixture(scope="module")
def prism_flags():
    wait_for_engine_setup("prism")
    r = subprocess.run(["bash", str(SCRIPT), "flags"], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


def test_every_job_on_prism_gives_the_direct_runners_output(prism_flags, demo_dir, demo_store, queries,  # noqa: F811
                                                            tmp_path, capsys):
    assert prism_flags[0] == "--runner=PrismRunner"
    store = tmp_path / "store"
    summary = precompute.run(["--input", f"{demo_dir}/{{00000..00002}}.tar", "--output", str(store), *prism_flags])
    assert "precompute: 100%" in capsys.readouterr().err  # the SDK harness runs in this process: the bar works
    ref, ref_summary = demo_store
    assert snapshot(store) == snapshot(ref)  # shard, failure and index bytes; the manifest but its time
    assert verify(str(store))["ok"]
    keep = ("shards", "images", "failures", "duplicates", "shard_bytes", "precision")
    assert {k: summary[k] for k in keep} == {k: ref_summary[k] for k in keep}
    assert_same_as_direct(retrieve_and_rerank(store, queries[0], prism_flags, tmp_path, "prism"),
                          retrieve_and_rerank(ref, queries[0], DIRECT, tmp_path, "direct"))


def prism_processes(binary: str) -> set:
    pids = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().split(b"\0")[0].decode() == binary:
                pids.add(int(d.name))
        except OSError:
            pass
    return pids


def test_a_job_run_as_a_command_leaves_no_prism_process(prism_flags, demo_store, queries, tmp_path):  # noqa: F811
    binary = prism_flags[1].split("=", 1)[1]
    before = prism_processes(binary)
    r = subprocess.run([sys.executable, "-m", "pipeline.retrieve", "--queries", str(queries[0]), "--store",
                        str(demo_store[0]), "--top_k", "3", "--output", str(tmp_path / "c.jsonl"), *prism_flags],
                       cwd=SCRIPT.parent.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["queries"] > 0
    assert prism_processes(binary) == before
