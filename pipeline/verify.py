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

from pipeline._cli import add_filesystem_flags, apply_filesystem_flags, finish
from schemas.verify import verify


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
