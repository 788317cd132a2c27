"""--decode torchvision: JPEG decode + preprocessing with torch ops (nvjpeg on CUDA), exercised on
the CPU here. The tensor path must match PIL + open_clip's transform closely, and a precompute
run with it must store the same ids and the same failure records as a PIL run."""
import io
import json

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from schemas.quantization import decode_embedding, decode_tokens
from scenes.photos import load_photo
from schemas.verify import verify
from schemas import manifest as mf
from tests.conftest import run_precompute, write_tar
from transforms.image_decode import decode_image
from transforms.tensor_decode import TensorJpegDecoder, TensorPreprocess, fast_jpeg_size

# Measured on the CPU (torch 2.14 / torchvision 0.29, 7 sizes x 2 chroma samplings x 3 photos,
# all five transform variants below): torchvision's libjpeg-turbo decode equals PIL's bit for bit,
# and the torch resize/crop/normalise differs from open_clip's PIL transform by at most 2 uint8
# levels on a pixel (0.0300 in normalised units) and 3.5e-5 on average (worst image 1.1e-4).
MEAN_ABS_TOL = 2.5e-4  # normalised units, per image
MAX_LEVELS_TOL = 2  # uint8 levels, per pixel


def encode(im, fmt="JPEG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    return [load_photo("astronaut"), load_photo("chelsea")]


SIZES = [(300, 200), (200, 300), (224, 224), (97, 61), (640, 480), (225, 500), (1000, 230)]


def test_fast_jpeg_size_takes_plain_jpegs_only(photos):
    im = photos[0].resize((120, 80))
    plain = encode(im)
    assert fast_jpeg_size(plain) == (120, 80)
    assert fast_jpeg_size(encode(im, progressive=True)) == (120, 80)
    assert fast_jpeg_size(encode(im, subsampling=0)) == (120, 80)  # 4:4:4
    assert fast_jpeg_size(encode(im, subsampling=1)) == (120, 80)  # 4:2:2
    for refused in (encode(im.convert("L")), encode(im.convert("CMYK")), encode(im, "PNG"), encode(im, "WEBP"),
                    plain[: len(plain) // 2],  # truncated: no end-of-image marker, PIL refuses it
                    b"\xff\xd8\xff not really a jpeg", b"", b"\xff\xd8"):
        assert fast_jpeg_size(refused) is None


def test_tensor_decode_equals_pil_decode_on_cpu(photos):
    dec = TensorJpegDecoder("cpu")
    datas = [encode(p.resize(s)) for p in photos for s in SIZES[:4]]
    for data, got in zip(datas, dec.decode(datas)):
        want = np.asarray(decode_image(data)).astype(np.int16)
        diff = np.abs(got.permute(1, 2, 0).numpy().astype(np.int16) - want)
        assert diff.mean() <= 0.5 and diff.max() <= MAX_LEVELS_TOL  # measured: 0 and 0
    assert dec.decode([b"\xff\xd8\xff not really a jpeg", datas[0]])[0] is None  # refused, not raised


@pytest.mark.parametrize("size,mode", [(64, "shortest"), (224, "shortest"), ((224, 160), "shortest"),
                                       (224, "squash"), ((192, 256), "longest")])
def test_tensor_preprocess_matches_open_clip_transform(photos, size, mode):
    ref_transform = open_clip.image_transform(size, is_train=False, resize_mode=mode)
    pre = TensorPreprocess(size, resize_mode=mode)
    dec = TensorJpegDecoder("cpu")
    level = 1 / 255 / min(open_clip.constants.OPENAI_DATASET_STD)  # one uint8 level, normalised
    for photo in photos:
        for w, h in SIZES:
            data = encode(photo.resize((w, h)), quality=90)
            want = ref_transform(decode_image(data))
            got = pre.normalize(pre.resize_crop(dec.decode([data])[0])[None])[0]
            assert got.shape == want.shape
            diff = (got - want).abs()
            assert diff.mean() <= MEAN_ABS_TOL, (w, h, diff.mean())
            assert diff.max() <= MAX_LEVELS_TOL * level + 1e-5, (w, h, diff.max())


def test_same_size_images_resized_together_give_the_same_pixels(photos):
    pre = TensorPreprocess(64)
    dec = TensorJpegDecoder("cpu")
    images = dec.decode([encode(p.resize((150, 100)), quality=q) for p in photos for q in (70, 95)])
    together = pre.resize_crop(torch.stack(images))
    assert together.shape == (4, 3, 64, 64)
    assert all(torch.equal(together[i], pre.resize_crop(im)) for i, im in enumerate(images))


def test_unknown_preprocess_settings_are_refused():
    with pytest.raises(ValueError, match="--decode pil"):
        TensorPreprocess(224, resize_mode="stretchy")
    with pytest.raises(ValueError, match="--decode pil"):
        TensorPreprocess(224, interpolation="lanczos")


def _shard_members(photos):
    """JPEGs of several sizes (one progressive, one 4:4:4), grayscale and CMYK JPEGs, PNG, WEBP,
    a corrupt and a truncated JPEG, a JPEG over the pixel cap, a duplicate key, a sample without
    an image; in an order where bad ones sit between good ones inside one batch."""
    a, b = photos
    good = encode(a.resize((300, 200)))
    return [
        ("j0.jpg", good), ("j0.txt", b"an astronaut"),
        ("j1.jpg", encode(b.resize((200, 300)), progressive=True)),
        ("bad.jpg", b"\xff\xd8\xff not really a jpeg"),
        ("png0.png", encode(a.resize((150, 150)), "PNG")),
        ("j2.jpg", encode(a.resize((97, 61)), subsampling=0)),
        ("cut.jpg", good[: len(good) // 2]),
        ("gray.jpg", encode(b.resize((120, 90)).convert("L"))),
        ("j0.jpg", encode(b.resize((50, 50)))),  # duplicate key
        ("cmyk.jpg", encode(a.resize((80, 100)).convert("CMYK"))),
        ("noimage.txt", b"caption only"),
        ("huge.jpg", encode(Image.new("RGB", (600, 400), "red"))),  # over --max_image_pixels 200000
        ("webp0.webp", encode(b.resize((90, 70)), "WEBP")),
        *[(f"k{i}.jpg", encode((a if i % 2 else b).resize((64 + 23 * i, 160 - 9 * i)))) for i in range(5)],
        *[(f"s{i}.jpg", encode(a.crop((10 * i, 0, 10 * i + 120, 90)))) for i in range(2)],  # same size
    ]


def _rows(store):
    m = mf.read(str(store))
    tables = [pq.read_table(store / s["path"]) for s in m["shards"]]
    fails = [pq.read_table(store / s["failures"]["path"]).to_pylist() for s in m["shards"] if s["failures"]]
    return m, [r for t in tables for r in t.to_pylist()], [f for t in fails for f in t]


def test_precompute_torchvision_decode_matches_pil_run(photos, tmp_path, monkeypatch):
    write_tar(tmp_path / "00000.tar", _shard_members(photos))
    calls = []
    real = TensorJpegDecoder.decode
    monkeypatch.setattr(TensorJpegDecoder, "decode", lambda self, datas: calls.append(len(datas)) or real(self, datas))
    common = ("--batch_size", "4", "--max_image_pixels", "200000")
    run_precompute(tmp_path / "00000.tar", tmp_path / "pil", *common)
    assert not calls
    summary = run_precompute(tmp_path / "00000.tar", tmp_path / "tv", *common, "--decode", "torchvision")
    # the plain JPEGs (10) went through the tensor decoder, in windows of at most one batch
    assert sum(calls) == 10 and max(calls) <= 4

    m_pil, rows_pil, fails_pil = _rows(tmp_path / "pil")
    m_tv, rows_tv, fails_tv = _rows(tmp_path / "tv")
    assert [r["image_id"] for r in rows_tv] == [r["image_id"] for r in rows_pil]
    assert {"j0", "j1", "j2", "png0", "gray", "cmyk", "webp0"} <= {r["image_id"] for r in rows_tv}
    assert summary["images"] == len(rows_tv) == 14
    strip = lambda fs: [(f["image_id"], f["stage"], f["reason"]) for f in fs]  # noqa: E731
    assert strip(fails_tv) == strip(fails_pil)  # same records, same order
    assert {(f[0], f[1]) for f in strip(fails_tv)} == {
        ("bad", "decode"), ("cut", "decode"), ("j0", "dedup"), ("noimage", "read"), ("huge", "decode")}
    assert all(" at 0x" not in f["reason"] for f in fails_tv)
    for a, b in zip(rows_pil, rows_tv):
        ta, tb = (decode_tokens(r["tokens"], r["token_scales"], 16, 384) for r in (a, b))
        cos = (ta * tb).sum(-1) / np.linalg.norm(ta, axis=-1) / np.linalg.norm(tb, axis=-1)
        assert cos.min() >= 0.99, (a["image_id"], cos.min())
        ea, eb = decode_embedding(a["embedding"]), decode_embedding(b["embedding"])
        assert float(ea @ eb) >= 0.99
        assert (a["caption"], a["metadata"]) == (b["caption"], b["metadata"])
    assert m_tv["producer"]["decode"] == "torchvision" and m_pil["producer"]["decode"] == "pil"
    assert json.loads((tmp_path / "tv" / "stats" / "00000.json").read_text())["decode"] == "torchvision"
    assert verify(str(tmp_path / "tv"))["ok"]

    # Same settings again: deterministic bytes.
    run_precompute(tmp_path / "00000.tar", tmp_path / "tv2", *common, "--decode", "torchvision")
    assert [s["sha256"] for s in mf.read(str(tmp_path / "tv2"))["shards"]] == [s["sha256"] for s in m_tv["shards"]]


def test_store_is_never_resumed_with_the_other_decoder(photos, tmp_path):
    write_tar(tmp_path / "00000.tar", [(f"k{i}.jpg", encode(photos[i % 2].resize((80, 60 + i)))) for i in range(5)])
    store = tmp_path / "store"
    stats = store / "stats" / "00000.json"
    run_precompute(tmp_path / "00000.tar", store)
    first = stats.stat().st_mtime_ns
    # a stats record from before the setting existed counts as pil: reused by a pil rerun
    rec = json.loads(stats.read_text())
    del rec["decode"]
    stats.write_text(json.dumps(rec))
    legacy = stats.stat().st_mtime_ns
    run_precompute(tmp_path / "00000.tar", store)
    assert stats.stat().st_mtime_ns == legacy != first
    run_precompute(tmp_path / "00000.tar", store, "--decode", "torchvision")
    assert stats.stat().st_mtime_ns != legacy  # redone, not mixed
    assert json.loads(stats.read_text())["decode"] == "torchvision"
    assert mf.read(str(store))["producer"]["decode"] == "torchvision"
    assert verify(str(store))["ok"]
