"""The store manifest (``manifest.json``): build, write atomically, read and validate.

Readers trust only the manifest: a shard that it does not list is not part of the store.
"""
import json
import logging
import re
from typing import List, Tuple

from schemas import columns as C
from schemas import storage

FORMAT = "edje-token-store"
VERSION = 1
MAX_MANIFEST_BYTES = 512 << 20
STATS_FORMAT = "edje-shard-stats"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
_VERSION = re.compile(r"^(\d{10})\.json$")
KEEP_VERSIONS = 5
log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """The manifest is missing, unreadable or does not follow the v1 contract."""


def _require(cond, msg):
    if not cond:
        raise ManifestError(msg)


def _check_rel_path(path, subdir, what):
    _require(isinstance(path, str), f"{what}: path must be a string")
    parts = path.split("/")
    _require(len(parts) == 2 and parts[0] == subdir and _NAME.match(parts[1]) is not None,
             f"{what}: path {path!r} must be '{subdir}/<name>' inside the store")


def _check_int(value, what):
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
             f"{what} must be a non-negative integer, got {value!r}")


def _check_file_entry(entry, subdir, what):
    _check_rel_path(entry.get("path"), subdir, what)
    _require(isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"]) is not None,
             f"{what}: sha256 must be 64 lowercase hex digits")
    _check_int(entry.get("bytes"), f"{what}: bytes")


def validate(manifest) -> dict:
    """Checks a parsed manifest against the v1 contract; returns it or raises ManifestError."""
    _require(isinstance(manifest, dict), "manifest must be a JSON object")
    if "commit" in manifest:  # absent in stores written before versioned commits
        _check_int(manifest["commit"], "commit")
    _require(manifest.get("format") == FORMAT, f"format must be {FORMAT!r}, got {manifest.get('format')!r}")
    _require(manifest.get("version") == VERSION,
             f"unsupported store version {manifest.get('version')!r} (this code reads version {VERSION})")
    model = manifest.get("model")
    _require(isinstance(model, dict), "model must be an object")
    _require(isinstance(model.get("fingerprint"), str) and _SHA256.match(model["fingerprint"]) is not None,
             "model.fingerprint must be a sha256 hex digest")
    for key in ("num_tokens", "token_dim", "embedding_dim"):
        _check_int(model.get(key), f"model.{key}")
        _require(model[key] > 0, f"model.{key} must be positive")
    quant = manifest.get("quantization")
    _require(isinstance(quant, dict) and isinstance(quant.get("scheme"), str), "quantization.scheme missing")
    shards = manifest.get("shards")
    _require(isinstance(shards, list), "shards must be a list")
    names = set()
    for i, s in enumerate(shards):
        what = f"shards[{i}]"
        _require(isinstance(s, dict), f"{what} must be an object")
        _check_file_entry(s, C.SHARDS_DIR, what)
        _require(isinstance(s.get("source"), str), f"{what}: source must be a string")
        _check_int(s.get("rows"), f"{what}: rows")
        _check_int(s.get("failed"), f"{what}: failed")
        _require(s.get("name") not in names, f"{what}: shard name {s.get('name')!r} listed twice")
        names.add(s.get("name"))
        if s.get("failures") is not None:
            _check_file_entry(s["failures"], C.FAILURES_DIR, f"{what}.failures")
    for i, s in enumerate(manifest.get("failed_shards", [])):
        _require(isinstance(s, dict) and isinstance(s.get("source"), str), f"failed_shards[{i}] malformed")
        if s.get("failures") is not None:
            _check_file_entry(s["failures"], C.FAILURES_DIR, f"failed_shards[{i}].failures")
    index = manifest.get("index")
    _require(isinstance(index, dict) and isinstance(index.get("files"), list), "index.files missing")
    _check_int(index.get("buckets"), "index.buckets")
    _require(index["buckets"] == len(index["files"]) and index["buckets"] > 0,
             "index.buckets must equal the number of index files")
    for i, f in enumerate(index["files"]):
        _check_file_entry(f, C.INDEX_DIR, f"index.files[{i}]")
    totals = manifest.get("totals")
    _require(isinstance(totals, dict), "totals must be an object")
    for key in ("rows", "failed", "duplicates"):
        _check_int(totals.get(key), f"totals.{key}")
    _require(totals["rows"] == sum(s["rows"] for s in shards),
             "totals.rows does not equal the sum of the shards' rows")
    return manifest


def manifest_path(store: str) -> str:
    return storage.join(store, C.MANIFEST)


def version_path(store: str, commit: int) -> str:
    return storage.join(store, C.MANIFESTS_DIR, f"{commit:010d}.json")


def versions(store: str) -> List[Tuple[int, str]]:
    """The store's committed manifest versions, oldest first: [(commit number, path)]."""
    found = []
    for path in storage.list_dir(storage.join(store, C.MANIFESTS_DIR)):
        m = _VERSION.match(storage.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def _read_valid(path: str) -> dict:
    try:
        manifest = storage.read_json(path, MAX_MANIFEST_BYTES)
    except ValueError as e:
        raise ManifestError(str(e)) from e
    try:
        return validate(manifest)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


def read(store: str) -> dict:
    """The committed manifest: ``manifest.json``, or, only while that is missing (a commit on a
    filesystem that cannot replace a file in one step, interrupted), the newest complete version.
    A manifest.json that exists but does not validate is refused, never papered over."""
    path = manifest_path(store)
    if storage.exists(path):
        return _read_valid(path)
    for commit, vpath in reversed(versions(store)):
        try:
            manifest = _read_valid(vpath)
        except ManifestError as e:
            log.warning("%s: skipping manifest version %d (%s)", store, commit, e)
            continue
        log.warning("%s: no %s; reading committed version %d (%s)", store, C.MANIFEST, commit, vpath)
        return manifest
    raise ManifestError(f"{store}: no {C.MANIFEST} (not a token store, or precompute has not finished)")


def write(store: str, manifest: dict) -> int:
    """Commits ``manifest``; returns its commit number. The protocol (docs/store.md, "The commit protocol"):

    1. every file the manifest lists is already in place under its final name;
    2. ``manifests/NNNNNNNNNN.json``, the next number, is written whole (temp name, then rename;
       an object appears whole on GCS and S3) and never changed again;
    3. ``manifest.json`` is replaced by the same bytes in one step (POSIX rename; an object
       overwrite on GCS and S3), so a reader always finds a complete manifest once one committed;
    4. versions older than the newest ``KEEP_VERSIONS`` are deleted.
    A crash before 2 leaves the previous commit in force; between 2 and 3, too (its successor
    finishes the job); during 4, only old versions remain, which the next commit removes.
    One writer at a time is the lease's job (``schemas.lease``).
    """
    existing = versions(store)
    commit = existing[-1][0] + 1 if existing else 1
    manifest = validate(dict(manifest, commit=commit))
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
    storage.write_bytes_atomic(version_path(store, commit), data)
    storage.write_bytes_atomic(manifest_path(store), data)
    stale = [p for _, p in existing[:max(0, len(existing) + 1 - KEEP_VERSIONS)]]
    storage.delete_quietly(stale)
    return commit
