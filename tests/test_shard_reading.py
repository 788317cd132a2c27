import gzip
import shutil

import pytest

from tests.conftest import write_tar
from transforms.shard_files import PatternError, assign_names, expand_patterns, plan_shards, shard_name
from transforms.tar_samples import ShardReadError, iter_samples


def samples_of(path, **kw):
    with open(path, "rb") as f:
        return list(iter_samples(f, **kw))


def test_members_grouped_by_key_with_webdataset_conventions(tmp_path):
    write_tar(tmp_path / "a.tar", [
        ("000.jpg", b"J0"), ("000.txt", b"cap0"), ("000.json", b"{}"),
        ("dir/001.PNG", b"P1"), ("dir/001.seg.txt", b"x"),
        ("002.txt", b"no image"),
        ("noext", b"ignored"),
    ])
    got = samples_of(tmp_path / "a.tar")
    assert [s.key for s in got] == ["000", "dir/001", "002"]
    assert got[0].members == {"jpg": b"J0", "txt": b"cap0", "json": b"{}"}
    assert got[1].members == {"png": b"P1", "seg.txt": b"x"} and got[1].image_extension() == "png"
    assert got[2].image_extension() is None
    scanned = samples_of(tmp_path / "a.tar", read_data=False)
    assert [s.key for s in scanned] == ["000", "dir/001", "002"] and scanned[0].members["jpg"] is None


def test_tar_gz_reads_like_tar_and_listing_keys_matches_reading(tmp_path):
    write_tar(tmp_path / "a.tar", [("000.jpg", b"J" * 5000), ("000.txt", b"t"), ("001.jpg", b"K"), ("002.txt", b"x")])
    with open(tmp_path / "a.tar", "rb") as src, gzip.open(tmp_path / "a.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    for name in ("a.tar", "a.tar.gz"):
        full = [(s.key, sorted(s.members)) for s in samples_of(tmp_path / name)]
        assert full == [("000", ["jpg", "txt"]), ("001", ["jpg"]), ("002", ["txt"])]
        assert [(s.key, sorted(s.members)) for s in samples_of(tmp_path / name, read_data=False)] == full


def test_truncated_tar_keeps_complete_samples_then_reports(tmp_path):
    members = [(f"{i:03d}.jpg", bytes([i]) * 3000) for i in range(6)]
    write_tar(tmp_path / "a.tar", members)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 512 * 24])  # inside the 4th member's data
    got = []
    with pytest.raises(ShardReadError, match="damaged"):
        with open(tmp_path / "cut.tar", "rb") as f:
            for s in iter_samples(f):
                got.append(s)
    assert [s.key for s in got] == ["000", "001", "002"]
    assert all(s.members["jpg"] == bytes([i]) * 3000 for i, s in enumerate(got))


def test_not_a_tar_and_oversize_members(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardReadError):
        samples_of(tmp_path / "x.tar")
    write_tar(tmp_path / "big.tar", [("000.jpg", b"x" * 5000), ("000.txt", b"ok")])
    (s,) = samples_of(tmp_path / "big.tar", max_member_bytes=1000)
    assert s.members == {"txt": b"ok"} and "cap" in s.problems[0][1]


def test_plan_shards_braces_globs_missing_and_side_files(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", [("a.jpg", b"x")])
        (tmp_path / f"{i:05d}.parquet").write_bytes(b"side")
        (tmp_path / f"{i:05d}_stats.json").write_text("{}")
    plan = plan_shards(f"{tmp_path}/{{00000..00003}}.tar")
    assert [s.name for s in plan.shards] == ["00000", "00001", "00002"]
    assert [s.ordinal for s in plan.shards] == [0, 1, 2]
    assert plan.missing == [f"{tmp_path}/00003.tar"]
    plan = plan_shards(f"{tmp_path}/*")
    assert [s.name for s in plan.shards] == ["00000", "00001", "00002"] and len(plan.ignored) == 6
    assert expand_patterns("a/{0..1}.tar,b.tar") == ["a/0.tar", "a/1.tar", "b.tar"]
    # a comma inside braces is the braces' list, not a second pattern
    assert expand_patterns("d/{a,b}.tar, c/{0..1}.tar") == ["d/a.tar", "d/b.tar", "c/0.tar", "c/1.tar"]
    assert [s.name for s in plan_shards(f"{tmp_path}/{{00000,00002}}.tar").shards] == ["00000", "00002"]
    with pytest.raises(PatternError, match="unbalanced braces in 'd/{a,b.tar'"):
        expand_patterns("d/{a,b.tar")


def test_output_names_are_stable_and_collision_free():
    assert shard_name("gs://b/x/00012.tar.gz") == "00012"
    specs = assign_names(["/d/b/00000.tar", "/d/a/00000.tar", "/d/a/00001.tar"])
    assert [s.source for s in specs] == ["/d/a/00000.tar", "/d/a/00001.tar", "/d/b/00000.tar"]
    names = [s.name for s in specs]
    assert len(set(names)) == 3 and names[1] == "00001" and names[0].startswith("00000-")
    assert assign_names(["/d/b/00000.tar", "/d/a/00000.tar", "/d/a/00001.tar"]) == specs


def test_corrupt_header_is_reported_not_taken_for_the_end(tmp_path):
    members = [(f"{i:03d}.jpg", bytes([i]) * 700) for i in range(5)]
    write_tar(tmp_path / "a.tar", members)
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[3 * 1536 + 148: 3 * 1536 + 156] = b"12345670"  # checksum field of the 4th header
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    got = []
    with pytest.raises(ShardReadError, match="corrupt tar header"):
        with open(tmp_path / "bad.tar", "rb") as f:
            got.extend(iter_samples(f))
    assert [s.key for s in got] == ["000", "001", "002"]
