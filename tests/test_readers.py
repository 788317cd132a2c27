"""The store is readable without project code: pyarrow, DuckDB and Polars.

The reader snippets are taken verbatim from docs/store.md (the code block after each
``<!-- snippet: NAME -->`` marker) and run against the demo store, so the docs cannot drift
from what works.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from schemas.quantization import decode_embedding, decode_tokens
from schemas.verify import verify
from schemas import index as idx

STORE_DOC = Path(__file__).resolve().parent.parent / "docs" / "store.md"  # the snippets of "Reading the store"
FP16_NORM_TOL = 2e-3  # fp16 has an 11-bit mantissa: ~5e-4 relative error per element


def readme_snippet(name: str) -> str:
    text = STORE_DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- snippet: %s -->\s*```python\n(.*?)```" % re.escape(name), text, re.S)
    assert m, f"docs/store.md has no python block after <!-- snippet: {name} -->"
    return m.group(1)


def run_snippet(name: str, store, **replace) -> dict:
    code = readme_snippet(name)
    assert 'store = "STORE"' in code, f"snippet {name} must start from store = \"STORE\""
    code = code.replace('"STORE"', repr(str(store)))
    for placeholder, value in replace.items():
        assert f'"{placeholder}"' in code
        code = code.replace(f'"{placeholder}"', repr(value))
    namespace = {"__name__": f"readme_snippet_{name}"}
    exec(compile(code, f"docs/store.md:{name}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def store(demo_store):
    path, summary = demo_store
    report = verify(str(path))
    assert report["ok"], report["problems"]
    return path


@pytest.fixture(scope="module")
def manifest(store):
    return json.loads((store / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pa_ns(store):
    return run_snippet("pyarrow", store)


@pytest.fixture(scope="module")
def duck_ns(store):
    return run_snippet("duckdb", store)


@pytest.fixture(scope="module")
def pl_ns(store):
    return run_snippet("polars", store)


def test_manifest_totals_match_summary(demo_store, manifest):
    _, summary = demo_store
    totals = manifest["totals"]
    assert totals["rows"] == summary["images"] == sum(s["rows"] for s in manifest["shards"]) > 0
    assert totals["failed"] == 0 and totals["duplicates"] == 0
    assert len(manifest["shards"]) == 3


def test_pyarrow_reads_and_decodes(pa_ns, manifest):
    m = manifest["model"]
    n, d, e = m["num_tokens"], m["token_dim"], m["embedding_dim"]
    table = pa_ns["table"]
    rows = manifest["totals"]["rows"]
    assert table.num_rows == rows
    ids = table["image_id"].to_pylist()
    assert len(set(ids)) == rows
    assert table.schema.field("tokens").type.byte_width == n * d
    assert table.schema.field("token_scales").type.byte_width == n * 4
    assert table.schema.field("embedding").type.byte_width == e * 2

    # one row: the docs recipe == schemas.quantization helpers
    row = pa_ns["row"]
    assert pa_ns["tokens"].shape == (n, d) and pa_ns["tokens"].dtype == np.float32
    np.testing.assert_array_equal(pa_ns["tokens"], decode_tokens(row["tokens"], row["token_scales"], n, d))
    assert pa_ns["emb"].shape == (e,)

    # whole columns: the vectorised decode == per-row decode_tokens, for every row
    all_tokens, all_q, all_s = pa_ns["all_tokens"], pa_ns["all_q"], pa_ns["all_s"]
    assert all_tokens.shape == (rows, n, d) and all_q.dtype == np.int8 and all_s.shape == (rows, n)
    for i, r in enumerate(table.to_pylist()):
        np.testing.assert_array_equal(all_tokens[i], decode_tokens(r["tokens"], r["token_scales"], n, d))
        np.testing.assert_array_equal(pa_ns["all_emb"][i].astype(np.float32), decode_embedding(r["embedding"]))

    # absmax quantization: every token with a positive scale uses the full int8 range, never -128
    assert np.all(all_s >= 0) and np.isfinite(all_s).all()
    absmax = np.abs(all_q.astype(np.int16)).max(axis=-1)
    assert np.all(absmax[all_s > 0] == 127)
    assert all_q.min() >= -127
    assert np.any(all_tokens != 0)

    # embeddings are L2-normalised (within fp16 rounding)
    norms = np.linalg.norm(pa_ns["all_emb"].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=FP16_NORM_TOL)


def test_duckdb_reads(duck_ns, pa_ns, manifest, store):
    rows = manifest["totals"]["rows"]
    assert duck_ns["count"] == duck_ns["listed_count"] == rows
    ids = [r[0] for r in duck_ns["rows"]]
    assert len(ids) == len(set(ids)) == rows
    assert set(ids) == set(pa_ns["table"]["image_id"].to_pylist())
    captions = {r[0]: r[1] for r in duck_ns["rows"]}
    assert captions == dict(zip(pa_ns["table"]["image_id"].to_pylist(), pa_ns["table"]["caption"].to_pylist()))
    assert all(c for c in captions.values())  # demo samples all have a .txt caption

    per_file = {Path(f).name: c for f, c in duck_ns["per_file"]}
    assert per_file == {Path(s["path"]).name: s["rows"] for s in manifest["shards"]}

    # the decoded first row equals the pyarrow decode of the same id
    n, d = duck_ns["n"], duck_ns["d"]
    assert duck_ns["tokens"].shape == (n, d)
    i = pa_ns["table"]["image_id"].to_pylist().index(duck_ns["image_id"])
    assert duck_ns["image_id"] == min(ids)
    np.testing.assert_array_equal(duck_ns["tokens"], pa_ns["all_tokens"][i])


def test_polars_reads(pl_ns, pa_ns, manifest):
    m = manifest["model"]
    n, d = m["num_tokens"], m["token_dim"]
    rows = manifest["totals"]["rows"]
    df, ids = pl_ns["df"], pl_ns["ids"]
    assert df.height == ids.height == rows
    assert ids.columns == ["image_id", "caption"]
    pl_ids = df["image_id"].to_list()
    assert len(set(pl_ids)) == rows
    pa_ids = pa_ns["table"]["image_id"].to_pylist()
    assert set(pl_ids) == set(pa_ids) == set(ids["image_id"].to_list())
    tokens = pl_ns["tokens"]
    assert tokens.shape == (rows, n, d)
    order = {image_id: i for i, image_id in enumerate(pa_ids)}
    for j, image_id in enumerate(pl_ids):
        np.testing.assert_array_equal(tokens[j], pa_ns["all_tokens"][order[image_id]])


def test_index_lookup(store, manifest, pa_ns):
    table = pa_ns["table"]
    by_id = {r["image_id"]: r for r in table.to_pylist()}
    buckets = manifest["index"]["buckets"]
    for image_id in sorted(by_id)[:: max(1, len(by_id) // 6)]:
        ns = run_snippet("index", store, IMAGE_ID=image_id)
        assert ns["bucket"] == idx.bucket_of(image_id, buckets)
        assert ns["record"]["image_id"] == image_id
        assert ns["record"] == by_id[image_id]


def test_int4_snippet_decodes_like_the_project(demo_store_int4):
    """The docs' numpy-only int4 decode == schemas.quantization.decode_tokens, for every row."""
    store, _ = demo_store_int4
    ns = run_snippet("int4", store)
    manifest = json.loads((store / "manifest.json").read_text())
    n, d = manifest["model"]["num_tokens"], manifest["model"]["token_dim"]
    rows = ns["table"].to_pylist()
    assert ns["tokens"].shape == (len(rows), n, d) == (manifest["totals"]["rows"], n, d)
    assert ns["q"].min() >= -7 and ns["q"].max() <= 7
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(
            ns["tokens"][i], decode_tokens(r["tokens"], r["token_scales"], n, d, manifest["quantization"]["scheme"]))
    assert np.any(ns["tokens"] != 0)
