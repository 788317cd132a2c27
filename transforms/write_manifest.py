"""Beam step: the final commit. Waits for every shard and index bucket, checks that the job still
holds the store's lease, commits the manifest (``schemas.manifest.write``: a new version, then
``manifest.json``), then removes temporary debris and index files the new manifest does not list."""
import datetime
import logging

import apache_beam as beam

from schemas import columns as C
from schemas import index as idx
from schemas import manifest as mf
from schemas import lease, shard_stats, storage
from schemas.quantization import get_scheme
from schemas.token_store import QUANT_SCHEME
from transforms.write_index import write_bucket

log = logging.getLogger(__name__)


def build_manifest(records, index_files, *, buckets, model, inputs, missing, producer, quantization=QUANT_SCHEME):
    records = sorted(records, key=lambda r: r["ordinal"])
    ok = [r for r in records if r["status"] == shard_stats.STATUS_OK]
    bad = [r for r in records if r["status"] != shard_stats.STATUS_OK]
    shards = [{
        "name": r["name"], "path": r["shard"]["path"], "source": r["source"], "rows": r["rows"],
        "failed": r["failed"], "duplicates": r["duplicates"], "bytes": r["shard"]["bytes"],
        "sha256": r["shard"]["sha256"], "failures": _file_entry(r["failures"]), "error": r.get("reason"),
    } for r in ok]
    failed_shards = [{"name": r["name"], "source": r["source"], "status": r["status"], "reason": r.get("reason"),
                      "rows": r["rows"], "bad_samples": r.get("bad_samples", 0),
                      "failures": _file_entry(r["failures"])} for r in bad]
    index_files = sorted(index_files, key=lambda f: f["bucket"])
    return {
        "format": mf.FORMAT, "version": mf.VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "quantization": get_scheme(quantization).manifest_entry(),
        "shards": shards,
        "failed_shards": failed_shards,
        "index": {"scheme": idx.SCHEME, "buckets": buckets,
                  "files": [{k: f[k] for k in ("path", "rows", "bytes", "sha256")} for f in index_files]},
        "totals": {"rows": sum(s["rows"] for s in shards),
                   "failed": sum(r["failed"] for r in records),
                   "duplicates": sum(r["duplicates"] for r in records),
                   "shards": len(shards), "failed_shards": len(failed_shards)},
        "inputs": inputs,
        "missing_inputs": missing,
        "producer": producer,
    }


def _file_entry(f):
    return None if f is None else {k: f[k] for k in ("path", "rows", "bytes", "sha256")}


def clean_debris(store: str, manifest: dict) -> None:
    """Deletes temp files in every store directory, and index files the manifest does not list."""
    listed_index = {storage.join(store, f["path"]) for f in manifest["index"]["files"]}
    for sub in (C.SHARDS_DIR, C.FAILURES_DIR, C.INDEX_DIR, C.STATS_DIR, C.MANIFESTS_DIR, ""):
        directory = storage.join(store, sub) if sub else store
        for path in storage.list_dir(directory):
            name = storage.basename(path)
            if name.startswith(storage.TMP_PREFIX) or (sub == C.INDEX_DIR and path not in listed_index):
                storage.delete_quietly([path])


def commit_store(_, records, index_files, *, store, buckets, model, inputs, missing, producer,
                 quantization=QUANT_SCHEME, lease_owner=None):
    written = {f["bucket"] for f in index_files}
    index_files = list(index_files) + [write_bucket(store, buckets, b, []) for b in range(buckets)
                                       if b not in written]
    manifest = build_manifest(records, index_files, buckets=buckets, model=model, inputs=inputs,
                              missing=missing, producer=producer, quantization=quantization)
    if lease_owner is not None:
        lease.check(store, lease_owner)
    mf.write(store, manifest)
    clean_debris(store, manifest)
    return manifest["totals"]


class WriteManifest(beam.PTransform):
    """(records, index files) -> a single element: the manifest totals, once it is committed."""

    def __init__(self, records, index_files, **kwargs):
        super().__init__()
        self.records, self.index_files, self.kwargs = records, index_files, kwargs

    def expand(self, pbegin):
        return (pbegin
                | "Once" >> beam.Create([None])
                | "Commit" >> beam.Map(commit_store, beam.pvalue.AsList(self.records),
                                       beam.pvalue.AsList(self.index_files), **self.kwargs))
