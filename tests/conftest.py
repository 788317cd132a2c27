"""Shared fixtures: every shard and store is generated here, in code."""
import io
import os
import subprocess
import tarfile
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pipeline import precompute  # noqa: E402
from scenes.photos import demo_samples  # noqa: E402

BEAM_LOCAL = ["--runner=DirectRunner", "--progress=off"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One-off downloads and builds of the engines the selected tests run on (cached after the first
# time): started when collection ends, so that they overlap the tests before them.
ENGINE_SETUP = {"flink": ["bash", "scripts/flink_local.sh", "fetch"],  # the jars: network-bound
                "prism": ["nice", "-n", "19", "bash", "scripts/prism.sh", "build"]}  # a Go build
_engine_setup = {}


def pytest_collection_finish(session):
    wanted = {m for item in session.items for m in ENGINE_SETUP if item.get_closest_marker(m)}
    for marker in sorted(wanted):
        log = open(os.path.join(tempfile.gettempdir(), f"edje-{marker}-setup-{os.getpid()}.log"), "wb")
        _engine_setup[marker] = subprocess.Popen(ENGINE_SETUP[marker], cwd=ROOT, stdout=log, stderr=log)


def wait_for_engine_setup(marker: str) -> None:
    """Waits for the background setup of ``marker``'s engine. Its outcome is not read here: the
    test's own call of the script reuses a finished setup and reports a failed one."""
    proc = _engine_setup.pop(marker, None)
    if proc is not None:
        proc.wait()


@pytest.fixture(scope="session", autouse=True)
def contained_tempdir(tmp_path_factory):
    """Beam leaves empty beam-temp* / beam-pipeline-temp* dirs behind; they go under pytest's own
    base temp (which pytest prunes), not the system's temp dir. TMPDIR reaches subprocess jobs too."""
    d = str(tmp_path_factory.mktemp("tmp"))
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = d, d
    os.environ.setdefault("EDJE_CACHE_DIR", os.path.join(d, "edje-cache"))  # int8 graphs, not in ~/.cache
    yield d
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


def tar_bytes(members) -> bytes:
    """A tar with exactly these (name, bytes) members, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path, members):
    """Writes a tar with exactly these (name, bytes) members, in order."""
    with open(path, "wb") as f:
        f.write(tar_bytes(members))


def demo_members(shard, count, seed=0):
    """(name, bytes) tar members of real-photo demo samples."""
    out = []
    for sample in demo_samples(shard, count, seed):
        key = sample.pop("__key__")
        out.extend((f"{key}.{ext}", data) for ext, data in sample.items())
    return out


def run_precompute(input_pattern, output, *extra):
    return precompute.run(["--input", str(input_pattern), "--output", str(output), *BEAM_LOCAL, *extra])


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """Three good shards of 8 real-photo samples each: 00000.tar .. 00002.tar."""
    d = tmp_path_factory.mktemp("demo_shards")
    for s in range(3):
        write_tar(d / f"{s:05d}.tar", demo_members(s, 8))
    return d


@pytest.fixture(scope="session")
def demo_store(demo_dir, tmp_path_factory):
    """A store precomputed from demo_dir with the embedded default checkpoint: (path, summary)."""
    store = tmp_path_factory.mktemp("demo_store") / "store"
    summary = run_precompute(f"{demo_dir}/{{00000..00002}}.tar", store)
    return store, summary


@pytest.fixture(scope="session")
def demo_store_int4(demo_dir, tmp_path_factory):
    """demo_dir precomputed like demo_store, with --quantization int4: (path, summary)."""
    store = tmp_path_factory.mktemp("demo_store_int4") / "store"
    summary = run_precompute(f"{demo_dir}/{{00000..00002}}.tar", store, "--quantization", "int4")
    return store, summary


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback, one process for the session."""
    from tests.object_stores import start_s3
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """The GCS emulator on loopback, one process for the session."""
    from tests.object_stores import start_gcs
    server = start_gcs()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server):
    """A fresh bucket on the S3 server."""
    from tests.object_stores import S3Store
    return S3Store(s3_server.port)


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """A fresh bucket on the GCS emulator (STORAGE_EMULATOR_HOST set for this test)."""
    from tests.object_stores import GcsStore
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{gcs_server.port}")
    return GcsStore(gcs_server.port)


def second_while_first_paused(cmd, lease_up, second, cwd):
    """Starts job ``cmd``, pauses it (SIGSTOP) once ``lease_up()`` holds, so that the overlap is
    certain, runs ``second()``, resumes the first and waits for it.
    Returns (what second() returned, the first job's exit code, its stderr)."""
    import signal
    import subprocess
    import time
    first = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not lease_up():
            time.sleep(0.02)
        assert first.poll() is None, "the first job ended before the second could start"
        first.send_signal(signal.SIGSTOP)
        try:
            result = second()
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
        return result, first.returncode, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
