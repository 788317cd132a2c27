"""Checking a token store (pipeline/verify.py is its command line; the checks are listed there)."""

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import columns as C
from schemas import manifest as mf
from schemas import lease, storage
from schemas.quantization import UnknownSchemeError
from schemas.token_store import FAILURE_SCHEMA, INDEX_SCHEMA, QUANT_SCHEME, token_schema


def _read_table(path, columns=None):
    with storage.open_read(path) as f:
        return pq.read_table(pa.PythonFile(f, mode="r"), columns=columns, page_checksum_verification=True)


def _check_file(store, entry, problems, what, check_hash):
    path = storage.join(store, entry["path"])
    if not storage.exists(path):
        problems.append({"shard": what, "problem": f"missing file {entry['path']}"})
        return None
    if check_hash:
        sha, size = storage.sha256_and_size(path)
    else:
        sha, size = entry["sha256"], storage.size(path)
    if size != entry["bytes"]:
        problems.append({"shard": what, "problem": f"{entry['path']}: {size} bytes, manifest says {entry['bytes']}"})
        return None
    if sha != entry["sha256"]:
        problems.append({"shard": what, "problem": f"{entry['path']}: sha256 mismatch (file changed or corrupt)"})
        return None
    return path


def _commit_state(store, manifest, problems, notes):
    """manifest.json against the committed versions (manifests/), and the writer's lease."""
    versions = mf.versions(store)
    if not storage.exists(mf.manifest_path(store)):
        problems.append({"shard": None, "problem": f"no {C.MANIFEST}: readers fall back to the newest version "
                                                   f"in {C.MANIFESTS_DIR}/; rerun precompute to finish the commit"})
    elif versions and versions[-1][0] > manifest.get("commit", 0):
        notes.append(f"{C.MANIFESTS_DIR}/ holds commit {versions[-1][0]}, newer than {C.MANIFEST}'s "
                     f"{manifest.get('commit')}: an interrupted commit, which the next precompute finishes")
    held = lease.read_lease(store)
    if held is not None and lease.breakable(held) is None:
        notes.append(f"a job is writing this store: {lease.describe(held)}")


def verify(store: str, check_hash: bool = True) -> dict:
    problems, notes = [], []
    try:
        manifest = mf.read(store)
    except mf.ManifestError as e:
        return {"ok": False, "store": store, "problems": [{"shard": None, "problem": str(e)}]}
    _commit_state(store, manifest, problems, notes)
    model = manifest["model"]
    scheme = manifest["quantization"]["scheme"]
    try:
        schema = token_schema(model["num_tokens"], model["token_dim"], model["embedding_dim"], scheme)
    except UnknownSchemeError as e:
        return {"ok": False, "store": store, "problems": [{"shard": None, "problem": str(e)}]}
    served = {}  # image_id -> (shard, row)
    duplicate_served = 0
    failed_rows = 0
    for s in manifest["shards"]:
        path = _check_file(store, s, problems, s["name"], check_hash)
        if path is None:
            continue
        try:
            table = _read_table(path)
        except Exception as e:
            problems.append({"shard": s["name"], "problem": f"unreadable Parquet: {type(e).__name__}: {e}"})
            continue
        if not table.schema.remove_metadata().equals(schema):
            problems.append({"shard": s["name"], "problem": f"schema does not match the manifest's model dims "
                                                            f"and quantization ({scheme})"})
        # shards written before the scheme was choosable carry int8's name too; none is mixed in
        declared = (table.schema.metadata or {}).get(b"edje.quantization", QUANT_SCHEME.encode()).decode()
        if declared != scheme:
            problems.append({"shard": s["name"], "problem": f"shard declares quantization {declared}, "
                                                            f"the manifest {scheme}"})
        if table.num_rows != s["rows"]:
            problems.append({"shard": s["name"], "problem": f"{table.num_rows} rows, manifest says {s['rows']}"})
        for row, image_id in enumerate(table.column(C.IMAGE_ID).to_pylist()):
            if image_id in served:
                duplicate_served += 1
                if duplicate_served <= 20:
                    problems.append({"shard": s["name"], "problem": f"id {image_id!r} also served by "
                                                                    f"{served[image_id][0]}"})
            else:
                served[image_id] = (s["name"], row)
        if s.get("failures"):
            fpath = _check_file(store, s["failures"], problems, s["name"], check_hash)
            if fpath is not None:
                ft = _read_table(fpath)
                failed_rows += ft.num_rows
                if not ft.schema.remove_metadata().equals(FAILURE_SCHEMA) or ft.num_rows != s["failed"]:
                    problems.append({"shard": s["name"], "problem": "failure file does not match the manifest"})
    for s in manifest.get("failed_shards", []):
        if s.get("failures"):
            fpath = _check_file(store, s["failures"], problems, s["name"], check_hash)
            if fpath is not None:
                failed_rows += _read_table(fpath).num_rows
    _check_index(store, manifest, served, problems, check_hash)
    listed = {storage.join(store, s["path"]) for s in manifest["shards"]}
    for path in storage.list_dir(storage.join(store, C.SHARDS_DIR)):
        if path not in listed:
            problems.append({"shard": storage.basename(path), "problem": "file in shards/ not listed in the manifest"})
    rows = sum(s["rows"] for s in manifest["shards"])
    return {"ok": not problems, "store": store, "rows": rows, "unique_ids": len(served),
            "failed": manifest["totals"]["failed"], "failure_records": failed_rows,
            "duplicates": manifest["totals"]["duplicates"], "shards": len(manifest["shards"]),
            "failed_shards": len(manifest.get("failed_shards", [])), "commit": manifest.get("commit"),
            "problems": problems, "notes": notes}


def _check_index(store, manifest, served, problems, check_hash):
    seen = 0
    for f in manifest["index"]["files"]:
        path = _check_file(store, f, problems, "index", check_hash)
        if path is None:
            return
        table = _read_table(path)
        if not table.schema.remove_metadata().equals(INDEX_SCHEMA):
            problems.append({"shard": "index", "problem": f"{f['path']}: wrong schema"})
            return
        for image_id, shard, row in zip(*(table.column(c).to_pylist() for c in (C.IMAGE_ID, C.SHARD, C.ROW))):
            seen += 1
            if served.get(image_id) != (shard, row):
                problems.append({"shard": shard, "problem": f"index entry {image_id!r} -> ({shard}, {row}) "
                                                            f"does not match the shards"})
                return
    if seen != len(served):
        problems.append({"shard": "index", "problem": f"index has {seen} ids, shards serve {len(served)}"})
