"""End to end through the real Beam DirectRunner, real Parquet files and the real open_clip model."""
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.checkpoint import load_vision_encoder
from schemas.quantization import decode_embedding, decode_tokens
from schemas.verify import verify
from schemas import index as idx
from schemas import manifest as mf
from tests.conftest import demo_members, run_precompute, write_tar
from tests.test_models import small_checkpoint
from transforms.image_decode import decode_image


def jpeg(color="red", size=(40, 30), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two good img2dataset-like shards, one of bad samples, one not a tar, one truncated."""
    d = tmp_path_factory.mktemp("mixed")
    write_tar(d / "00000.tar", demo_members(0, 8))
    write_tar(d / "00001.tar", demo_members(1, 8))
    (d / "00000.parquet").write_bytes(b"img2dataset side file")
    (d / "00000_stats.json").write_text("{}")
    write_tar(d / "00002.tar", [
        ("garbage.jpg", b"\xff\xd8\xff not really a jpeg"),
        ("empty.jpg", b""),
        ("noimage.txt", b"a caption without an image"),
        ("000000003.jpg", jpeg("blue")),  # same key as a sample of 00000.tar: that one wins
        ("good_a.jpg", jpeg("green")), ("good_a.json", b'{"url": "http://x/a.jpg"}'),
        ("cmyk.jpg", jpeg((0, 255, 0, 0), mode="CMYK")),
        ("good_a.jpg", jpeg("yellow")),  # the key again, later in the shard: a duplicate
        ("caption.png", _png()), ("caption.txt", b"\xff\xfe bad utf8 " + b"x" * 10000),
        *ODD_BUT_VALID,
    ])
    (d / "00003.tar").write_bytes(b"<html>not a tar</html>" * 50)
    write_tar(d / "cut.tar", demo_members(4, 4))
    data = (d / "cut.tar").read_bytes()
    (d / "00004.tar").write_bytes(data[: len(data) // 2])
    (d / "cut.tar").unlink()
    store = tmp_path_factory.mktemp("mixed_store") / "store"
    summary = run_precompute(f"{d}/*", store, "--batch_size", "4")
    return d, store, summary


def _encoded(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _animated_gif():
    frames = [Image.new("RGB", (12, 12), c) for c in ("red", "blue", "green")]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


ODD_BUT_VALID = [  # must be encoded, not failed
    ("mode16.png", _encoded(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG")),
    ("palette.gif", _encoded(Image.new("P", (20, 20), 3), "GIF", transparency=0)),
    ("rgba.png", _encoded(Image.new("RGBA", (20, 20), (0, 0, 255, 128)), "PNG")),
    ("onepixel.bmp", _encoded(Image.new("RGB", (1, 1), "white"), "BMP")),
    ("animated.gif", _animated_gif()),
    ("nocaption.webp", _encoded(Image.new("RGB", (20, 20), "blue"), "WEBP")),
]


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "white").save(buf, format="PNG")
    return buf.getvalue()


def read_all(store, sub):
    manifest = mf.read(str(store))
    files = [s["path"] for s in manifest["shards"]] if sub == "shards" else \
        [e["failures"]["path"] for e in manifest["shards"] + manifest["failed_shards"] if e["failures"]]
    tables = [pq.read_table(store / p, page_checksum_verification=True) for p in files]
    return manifest, [r for t in tables for r in t.to_pylist()]


def test_mixed_input_every_good_sample_once_every_bad_one_recorded(mixed):
    d, store, summary = mixed
    manifest, rows = read_all(store, "shards")
    ids = [r["image_id"] for r in rows]
    expected_good = {k for k, _ in demo_members(0, 8) + demo_members(1, 8)}
    expected_good = {name.split(".")[0] for name in expected_good}
    assert len(ids) == len(set(ids))
    truncated = {i for i in ids if i.startswith("00004")}
    assert 0 < len(truncated) < 4
    odd = {name.split(".")[0] for name, _ in ODD_BUT_VALID}
    assert set(ids) == expected_good | {"good_a", "cmyk", "caption"} | odd | truncated
    assert summary["images"] == len(ids) == manifest["totals"]["rows"]
    metrics = summary["metrics"]  # the Beam counters every runner reports
    assert metrics["images_ok"] == len(ids) and metrics["shards_written"] == 4
    assert metrics["shards_failed"] == 1 and metrics["images_failed"] == manifest["totals"]["failed"]
    assert metrics["bytes_written"] >= sum(s["bytes"] for s in manifest["shards"])
    assert summary["failed_shards"] == 1 and summary["ignored_side_files"] == 2

    _, failures = read_all(store, "failures")
    got = {(f["image_id"], f["stage"]) for f in failures}
    assert {("garbage", "decode"), ("empty", "decode"), ("noimage", "read"),
            ("000000003", "dedup"), ("good_a", "dedup")} <= got
    assert all(f["reason"] == "duplicate_id" for f in failures if f["stage"] == "dedup")
    shard_level = [f for f in failures if f["image_id"] is None]
    assert {f["source"].rsplit("/", 1)[1] for f in shard_level} == {"00003.tar", "00004.tar"}
    assert all(f["reason"] for f in failures)
    assert manifest["totals"]["duplicates"] == 2
    assert manifest["totals"]["failed"] == len(failures)
    assert [s["name"] for s in manifest["failed_shards"]] == ["00003"]

    # The earliest shard's copy of a duplicated id is the one served.
    served = {r["image_id"]: r for r in rows}
    assert json.loads(served["000000003"]["metadata"])["key"] == "000000003"
    assert served["good_a"]["metadata"] == '{"url": "http://x/a.jpg"}'
    caption = served["caption"]["caption"]
    assert caption.startswith("\ufffd") and len(caption) <= 4096
    assert verify(str(store))["ok"]


def test_tokens_match_adapter_output_within_int8_error(demo_store, demo_dir):
    store, summary = demo_store
    manifest = mf.read(str(store))
    m, h = manifest["model"]["num_tokens"], manifest["model"]["token_dim"]
    table = pq.read_table(store / "shards" / "00001.parquet")
    encoder, _, fp = load_vision_encoder(None)
    assert manifest["model"]["fingerprint"] == fp
    transform = encoder.backbone.image_transform()
    members = dict(demo_members(1, 8))
    for row in table.to_pylist():
        ext = next(e for e in ("jpg", "png", "webp") if f"{row['image_id']}.{e}" in members)
        x = transform(decode_image(members[f"{row['image_id']}.{ext}"]))[None]
        with torch.no_grad():
            want_tokens, want_emb = (t[0].numpy() for t in encoder(x))
        got = decode_tokens(row["tokens"], row["token_scales"], m, h)
        scales = np.frombuffer(row["token_scales"], "<f4")
        assert np.all(np.abs(got - want_tokens) <= scales[:, None] * 0.5 + 1e-5)
        emb = decode_embedding(row["embedding"])
        assert np.allclose(emb, want_emb, atol=2e-3) and abs(np.linalg.norm(emb) - 1) < 2e-3


def test_token_columns_take_at_most_1_05_bytes_per_element(demo_store):
    store, _ = demo_store
    manifest = mf.read(str(store))
    m, h = manifest["model"]["num_tokens"], manifest["model"]["token_dim"]
    stored = rows = 0
    for s in manifest["shards"]:
        meta = pq.ParquetFile(store / s["path"]).metadata
        rows += meta.num_rows
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                if col.path_in_schema in ("tokens", "token_scales"):
                    stored += col.total_compressed_size
    assert rows == manifest["totals"]["rows"] == 24
    assert stored / (rows * m * h) <= 1.05


def test_index_routes_every_id_to_its_row(demo_store):
    store, _ = demo_store
    manifest = mf.read(str(store))
    buckets = manifest["index"]["buckets"]
    entries = {}
    for f in manifest["index"]["files"]:
        b = int(f["path"].split("ids-")[1][:5])
        for r in pq.read_table(store / f["path"]).to_pylist():
            assert idx.bucket_of(r["image_id"], buckets) == b
            entries[r["image_id"]] = (r["shard"], r["row"])
    for s in manifest["shards"]:
        for row, image_id in enumerate(pq.read_table(store / s["path"], columns=["image_id"]).column(0).to_pylist()):
            assert entries.pop(image_id) == (s["name"], row)
    assert not entries


def test_rerun_skips_committed_shards_and_refuses_another_checkpoint(demo_dir, tmp_path):
    store = tmp_path / "store"
    run_precompute(f"{demo_dir}/{{00000..00001}}.tar", store)
    first = json.loads((store / "manifest.json").read_text())
    stats_mtime = (store / "stats" / "00000.json").stat().st_mtime_ns
    (store / "shards" / ".tmp-deadbeef-00000.parquet").write_bytes(b"debris of a killed run")
    summary = run_precompute(f"{demo_dir}/{{00000..00002}}.tar", store)
    assert (store / "stats" / "00000.json").stat().st_mtime_ns == stats_mtime  # skipped, not redone
    second = json.loads((store / "manifest.json").read_text())
    assert summary["shards"] == 3 and second["shards"][:2] == first["shards"]
    assert sorted(p.name for p in (store / "shards").iterdir()) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    with pytest.raises(SystemExit, match="does not list"):
        run_precompute(f"{demo_dir}/{{00000..00001}}.tar", store)
    run_precompute(f"{demo_dir}/{{00000..00002}}.tar", store, "--batch_size", "3")
    assert (store / "stats" / "00000.json").stat().st_mtime_ns != stats_mtime  # other settings: redone
    assert json.loads((store / "stats" / "00000.json").read_text())["batch_size"] == 3
    small_checkpoint(tmp_path / "other")
    with pytest.raises(SystemExit, match="new --output"):
        run_precompute(f"{demo_dir}/00000.tar", store, "--checkpoint", str(tmp_path / "other"))


def test_same_bytes_whatever_the_batch_boundaries_of_bundles(demo_dir, demo_store, tmp_path):
    """Bundle replay (a retried bundle) must not add rows or change bytes."""
    store, _ = demo_store
    again = tmp_path / "again"
    run_precompute(f"{demo_dir}/{{00000..00002}}.tar", again, "--direct_runner_bundle_repeat=2")
    a, b = mf.read(str(store)), mf.read(str(again))
    assert [(s["name"], s["rows"], s["sha256"]) for s in a["shards"]] == \
           [(s["name"], s["rows"], s["sha256"]) for s in b["shards"]]
    assert verify(str(again))["ok"]


def test_no_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no input shards"):
        run_precompute(f"{tmp_path}/nothing-*.tar", tmp_path / "s")
    with pytest.raises(SystemExit, match=r"--input: unbalanced braces in '.*/\{0000\.\.0003\.tar'"):
        run_precompute(f"{tmp_path}/{{0000..0003.tar", tmp_path / "s")


def test_failure_budget_commits_nothing_for_a_mostly_bad_shard(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_tar(d / "00000.tar", demo_members(0, 6))
    bad = [(f"b{i:03d}.jpg", b"\xff\xd8 broken") for i in range(15)] + demo_members(1, 5)
    write_tar(d / "00001.tar", bad)
    store = tmp_path / "store"
    with pytest.raises(SystemExit, match="00001.tar: failure budget exceeded: 15 of 20") as err:
        run_precompute(f"{d}/*.tar", store, "--failure_budget_min_samples", "10")
    assert err.value.summary["images"] == 6
    manifest = mf.read(str(store))
    assert [s["name"] for s in manifest["shards"]] == ["00000"]
    assert manifest["failed_shards"][0]["status"] == "over_budget"
    assert not (store / "shards" / "00001.parquet").exists() and not (store / "failures" / "00001.parquet").exists()
    assert verify(str(store))["ok"]
    # A looser budget commits it, bad samples recorded; the good shard is reused.
    summary = run_precompute(f"{d}/*.tar", store, "--failure_budget_min_samples", "10", "--max_failure_rate", "0.8")
    assert summary["images"] == 11 and summary["failures"] == 15


def test_non_finite_model_output_fails_the_sample_not_the_job(tmp_path, demo_dir):
    cfg, backbone, adapter, _ = small_checkpoint(tmp_path / "ok")
    with torch.no_grad():
        adapter.projection.bias[0] = float("nan")
    from models.checkpoint import load_joint_encoder, save_checkpoint
    joint, _, _, _ = load_joint_encoder(tmp_path / "ok")
    save_checkpoint(tmp_path / "nan", cfg, {"backbone": backbone, "adapter": adapter, "joint": joint})
    store = tmp_path / "store"
    summary = run_precompute(f"{demo_dir}/00000.tar", store, "--checkpoint", str(tmp_path / "nan"),
                             "--max_failure_rate", "1")
    assert summary["images"] == 0 and summary["failures"] == 8
    failures = pq.read_table(store / "failures" / "00000.parquet").to_pylist()
    assert {f["stage"] for f in failures} == {"encode"} and "non-finite" in failures[0]["reason"]


def test_corrupt_header_and_empty_shards(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_tar(d / "00000.tar", demo_members(0, 4))
    members = demo_members(1, 4)
    write_tar(d / "00001.tar", members)
    data = bytearray((d / "00001.tar").read_bytes())
    offset = sum(512 + -(-len(b) // 512) * 512 for _, b in members[:6])  # header of the 7th member
    data[offset + 148: offset + 156] = b"99999999"  # break its header checksum
    (d / "00001.tar").write_bytes(bytes(data))
    write_tar(d / "00002.tar", [])  # a valid, empty tar
    (d / "00003.tar").write_bytes(b"")  # a zero-byte file
    store = tmp_path / "store"
    summary = run_precompute(f"{d}/*.tar", store)
    manifest = mf.read(str(store))
    rows = {s["name"]: s["rows"] for s in manifest["shards"]}
    assert rows["00000"] == 4 and rows["00001"] == 2 and rows["00002"] == 0
    assert manifest["shards"][1]["error"] and [s["name"] for s in manifest["failed_shards"]] == ["00003"]
    assert verify(str(store))["ok"] and summary["images"] == 6
