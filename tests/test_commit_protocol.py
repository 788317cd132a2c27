"""The manifest commit protocol under fault injection, on a local store and on S3 (moto server).

A child process commits a second manifest over a committed store and is killed (os._exit) before
each filesystem mutation of the commit, in the middle of each file it writes, and after the last. After every
kill, a reader must open a complete manifest (the old commit or the new one, never none, never a
mix), and the next commit must leave no debris."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from schemas import columns as C
from schemas import manifest as mf
from schemas import storage
from schemas.reader import TokenStore
from transforms.write_manifest import clean_debris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, os, sys
from apache_beam.io.filesystems import FileSystems
from schemas import manifest as mf
from schemas import storage
from transforms.write_manifest import clean_debris

store, options, manifest_file, kill_at, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
storage.set_filesystem_options(options)
manifest = json.load(open(manifest_file))
ops = []
real_create, real_rename, real_delete = FileSystems.create, FileSystems.rename, FileSystems.delete


class HalfThenDie:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        data = bytes(data)
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os._exit(137)

    def __getattr__(self, name):
        return getattr(self.f, name)


def point(kind):
    ops.append(kind)
    if len(ops) == kill_at and mode == "before":
        os._exit(137)
    return len(ops) == kill_at and mode == "mid"


def done():
    if len(ops) == kill_at and mode == "after":
        os._exit(137)


def create(path, *a, **k):
    mid = point("create")
    f = real_create(path, *a, **k)
    return HalfThenDie(f) if mid else f


def rename(src, dst):
    point("rename")
    real_rename(src, dst)
    done()


def delete(paths):
    point("delete")
    real_delete(paths)
    done()


FileSystems.create, FileSystems.rename, FileSystems.delete = create, rename, delete
mf.write(store, manifest)
clean_debris(store, manifest)
print(json.dumps(ops))
'''


def run_child(store, options, manifest_file, kill_at=0, mode="before"):
    return subprocess.run([sys.executable, "-c", CHILD, store, json.dumps(options), str(manifest_file),
                           str(kill_at), mode], cwd=ROOT, capture_output=True, text=True, timeout=120)


class LocalStores:
    options = None

    def __init__(self, source, tmp_path):
        self.source, self.tmp_path, self.n = source, tmp_path, 0

    def fresh(self):
        self.n += 1
        dst = self.tmp_path / f"store{self.n}"
        shutil.copytree(self.source, dst)
        return str(dst)

    def names(self, store):
        return [os.path.relpath(os.path.join(d, f), store) for d, _, fs in os.walk(store) for f in fs]


class S3Stores:
    def __init__(self, source, s3):
        self.source, self.s3, self.n, self.options = source, s3, 0, s3.options
        self.files = [os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs]

    def fresh(self):
        self.n += 1
        for rel in self.files:
            with open(os.path.join(self.source, rel), "rb") as f:
                self.s3.put(f"store{self.n}/{rel}", f.read())
        return self.s3.url(f"store{self.n}")

    def names(self, store):
        prefix = store.split("/", 3)[3] + "/"
        return [k[len(prefix):] for k in self.s3.keys(prefix)]


@pytest.fixture(params=["local", "s3"])
def stores(request, demo_store, tmp_path):
    if request.param == "local":
        return LocalStores(demo_store[0], tmp_path)
    return S3Stores(demo_store[0], request.getfixturevalue("s3"))


def check_reader(store, old, new):
    """A reader sees one whole commit: the old or the new, and the store it describes opens."""
    got = mf.read(store)
    assert got["commit"] in (1, 2)
    assert got["inputs"] == (old if got["commit"] == 1 else new)["inputs"]
    ts = TokenStore(store)
    ids, tokens, _ = ts.read_rows(next(iter(ts.shards)), [0])
    found, tokens, _, missing = ts.get(ids)  # through the id index
    assert found == ids and tokens.shape[0] == 1 and not missing
    return got["commit"]


@pytest.mark.slow
def test_readers_see_a_whole_manifest_after_a_kill_at_every_step(stores, tmp_path):
    storage.set_filesystem_options(stores.options)
    probe = stores.fresh()
    old = mf.read(probe)
    assert old["commit"] == 1
    new = dict(old, inputs="the second commit")
    new.pop("commit")
    manifest_file = tmp_path / "new.json"
    manifest_file.write_text(json.dumps(new))
    r = run_child(probe, stores.options, manifest_file)
    assert r.returncode == 0, r.stderr[-3000:]
    ops = json.loads(r.stdout)
    assert ops[:4] == ["create", "rename", "create", "rename"], ops  # version, then manifest.json
    points = [(k, "before") for k in range(1, len(ops) + 1)] + [(len(ops), "after")]
    points += [(k, "mid") for k, kind in enumerate(ops, start=1) if kind == "create"]
    seen = set()
    for kill_at, mode in points:
        store = stores.fresh()
        r = run_child(store, stores.options, manifest_file, kill_at, mode)
        assert r.returncode == 137, (kill_at, mode, r.stderr[-2000:])
        seen.add(check_reader(store, old, new))
        # The next commit (what a rerun of precompute does) completes and leaves no debris.
        committed = mf.write(store, new)
        clean_debris(store, mf.read(store))
        assert mf.read(store)["commit"] == committed and mf.read(store)["inputs"] == new["inputs"]
        names = stores.names(store)
        assert not [n for n in names if os.path.basename(n).startswith(storage.TMP_PREFIX)], (kill_at, mode, names)
    assert seen == {1, 2}  # the kills fell both before and after the switch


def test_manifest_json_is_the_newest_version_and_old_versions_are_pruned(demo_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo_store[0], store)
    manifest = mf.read(str(store))
    for _ in range(mf.KEEP_VERSIONS + 2):
        last = mf.write(str(store), manifest)
    assert last == mf.KEEP_VERSIONS + 3
    versions = mf.versions(str(store))
    assert [n for n, _ in versions] == list(range(last - mf.KEEP_VERSIONS + 1, last + 1))
    assert (store / C.MANIFEST).read_bytes() == open(versions[-1][1], "rb").read()


def test_a_missing_manifest_json_falls_back_to_the_newest_version_and_verify_says_so(demo_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo_store[0], store)
    m = mf.read(str(store))
    mf.write(str(store), dict(m, inputs="second"))
    (store / C.MANIFEST).unlink()
    got = mf.read(str(store))
    assert got["commit"] == 2 and got["inputs"] == "second"
    from schemas.verify import verify
    report = verify(str(store))
    assert not report["ok"] and any("no manifest.json" in p["problem"] for p in report["problems"])


def test_a_store_from_before_versioned_commits_stays_readable(demo_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo_store[0], store)
    shutil.rmtree(store / C.MANIFESTS_DIR)
    m = json.loads((store / C.MANIFEST).read_text())
    m.pop("commit")
    (store / C.MANIFEST).write_text(json.dumps(m))
    assert "commit" not in mf.read(str(store))
    assert len(TokenStore(str(store))) == m["totals"]["rows"]
    assert mf.write(str(store), m) == 1  # its first versioned commit


def test_an_invalid_manifest_json_is_refused_not_papered_over(demo_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo_store[0], store)
    (store / C.MANIFEST).write_text("{ half a manifest")
    with pytest.raises(mf.ManifestError, match="not valid UTF-8 JSON"):
        mf.read(str(store))
