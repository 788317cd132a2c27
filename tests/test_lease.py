"""The store's writer lease: refusal while live, takeover once dead or expired, renewal, fence."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from schemas import lease as L
from tests.conftest import BEAM_LOCAL, second_while_first_paused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_record(store, **fields):
    os.makedirs(store, exist_ok=True)
    record = {"format": L.FORMAT, "owner": "someone", "job": "precompute", "host": socket.gethostname(),
              "pid": os.getpid(), "expires_at": time.time() + 60, **fields}
    with open(L.lease_path(str(store)), "w") as f:
        json.dump(record, f)


def test_a_live_lease_refuses_a_second_writer_and_release_frees_it(tmp_path):
    store = str(tmp_path / "store")
    with L.StoreLease(store, "first", settle=0.05):
        with pytest.raises(L.LeaseHeld, match="is being written by first"):
            L.StoreLease(store, "second", settle=0.05).acquire()
    assert L.read_lease(store) is None
    with L.StoreLease(store, "second", settle=0.05) as held:
        assert L.read_lease(store)["owner"] == held.owner


def test_the_lease_of_a_dead_process_on_this_host_is_broken_at_once(tmp_path):
    store = str(tmp_path / "store")
    child = subprocess.run([sys.executable, "-c", "import os, sys; from schemas import lease as L; "
                            f"L.StoreLease({store!r}, 'crashed', settle=0.05).acquire(); os._exit(9)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == 9, child.stderr
    dead = L.read_lease(store)
    assert dead["job"] == "crashed" and "is gone" in L.breakable(dead)
    with L.StoreLease(store, "rerun", settle=0.05) as held:
        assert L.read_lease(store)["owner"] == held.owner


def test_another_hosts_lease_holds_until_it_expires(tmp_path):
    store = str(tmp_path / "store")
    write_record(store, host="elsewhere", pid=1, expires_at=time.time() + 60)
    with pytest.raises(L.LeaseHeld, match="elsewhere"):
        L.StoreLease(store, "second", settle=0.05).acquire()
    write_record(store, host="elsewhere", pid=1, expires_at=time.time() - 1)
    with L.StoreLease(store, "second", settle=0.05):
        assert L.read_lease(store)["job"] == "second"


def test_the_heartbeat_renews_the_lease(tmp_path):
    store = str(tmp_path / "store")
    with L.StoreLease(store, "slow", ttl=0.8, settle=0.05) as held:
        first = L.read_lease(store)["expires_at"]
        time.sleep(1.2)  # past the first expiry: renewed meanwhile
        assert L.read_lease(store)["expires_at"] > first
        L.check(store, held.owner)
        assert held.lost is None


def test_the_fence_catches_a_takeover_and_release_keeps_the_successors_lease(tmp_path):
    store = str(tmp_path / "store")
    held = L.StoreLease(store, "paused", ttl=60, settle=0.05).acquire()
    try:
        L.check(store, held.owner)
        write_record(store, owner="usurper", host="elsewhere")
        with pytest.raises(L.LeaseLost, match="usurper"):
            L.check(store, held.owner)
    finally:
        held.release()
    assert L.read_lease(store)["owner"] == "usurper"


def test_an_unreadable_lease_counts_as_held(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "lease.json").write_text("{ half")
    with pytest.raises(L.LeaseHeld):
        L.StoreLease(str(store), "second", settle=0.05).acquire()


def lease_written(store) -> bool:
    """The lease file exists and is complete (it is created empty, then written: pausing the first
    job in between would leave the second an unreadable lease, refused with another message)."""
    try:
        return (store / "lease.json").read_text().rstrip().endswith("}")
    except OSError:
        return False


@pytest.mark.slow
def test_a_second_precompute_is_refused_while_the_first_holds_the_store(demo_dir, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "pipeline.precompute", *BEAM_LOCAL, "--input",
           f"{demo_dir}/{{00000..00002}}.tar", "--output", str(store)]
    second, code, err = second_while_first_paused(
        cmd, lambda: lease_written(store),
        lambda: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300), ROOT)
    assert second.returncode != 0 and "is being written by precompute" in second.stderr, second.stderr[-2000:]
    assert code == 0, err[-3000:]
    from schemas.verify import verify
    report = verify(str(store))
    assert report["ok"] and report["commit"] == 1 and not (store / "lease.json").exists()
