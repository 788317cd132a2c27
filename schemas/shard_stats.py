"""Per-shard stats records, ``stats/<name>.json``: the commit record of one input shard.

Written last for a shard, atomically, after its token and failure files are in place: a shard
with an ``ok`` record whose fingerprint matches is skipped by a rerun.
"""
from schemas import columns as C
from schemas import storage

FORMAT = "edje-shard-stats"
MAX_BYTES = 16 << 20
STATUS_OK = "ok"
STATUS_FAILED = "failed"  # unreadable: a failure record, no token file
STATUS_OVER_BUDGET = "over_budget"  # too many bad samples: nothing committed


def path(store: str, name: str) -> str:
    return storage.join(store, C.STATS_DIR, f"{name}.json")


def read(store: str, name: str):
    """The record, or None if absent or unreadable (an unreadable record means: redo the shard)."""
    p = path(store, name)
    if not storage.exists(p):
        return None
    try:
        rec = storage.read_json(p, MAX_BYTES)
    except (ValueError, OSError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None


def write(store: str, record: dict) -> None:
    storage.write_json_atomic(path(store, record["name"]), dict(record, format=FORMAT))
