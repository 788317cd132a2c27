"""Verify: integrity check of a token store, like fsck.

    python -m pipeline.verify --store STORE

Checks the manifest against the contract, every listed file's size and sha256, Parquet page
checksums, each shard's schema (column widths of the manifest's quantization scheme, and the
scheme in the shard's metadata) and row count, ids unique across the store, the id index
(every served id, pointing at the right row), files under shards/ that the manifest does not
list, and manifest.json against the committed versions under manifests/. Prints a JSON summary
(ok, rows, unique_ids, failed, duplicates, commit, problems naming the shard, notes such as a
live writer's lease) and exits 1 on any problem. Object stores: Beam's S3 and GCS flags (below).
"""
import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline._cli import add_filesystem_flags, apply_filesystem_flags, finish
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="token store directory or URL")
    ap.add_argument("--no_hash", action="store_true", help="skip sha256 (sizes and Parquet checks still run)")
    fs_flags = add_filesystem_flags(ap)
    args = ap.parse_args(argv)
    apply_filesystem_flags(args, fs_flags)
    report = verify(args.store.rstrip("/"), check_hash=not args.no_hash)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    finish(main())
