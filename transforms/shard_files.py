"""Finding input shards and naming their outputs.

Patterns may use webdataset/bash braces (``shards/{00000..00099}.tar``) and globs, on any
filesystem Beam knows. Output names come from the input file name only (never from worker
count or timing), so a rerun maps every input to the same token shard.
"""
import hashlib
import logging
import posixpath
import re
from typing import List, NamedTuple

import braceexpand
from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# img2dataset writes these beside its shards; a broad glob matching them is not an error.
SIDE_FILE_SUFFIXES = ("_stats.json", ".parquet")
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")


class ShardSpec(NamedTuple):
    ordinal: int  # position in sorted input order: the earliest shard wins duplicate ids
    name: str  # output name (no extension)
    source: str  # input URL


class ShardPlan(NamedTuple):
    shards: List[ShardSpec]
    missing: List[str]  # literal (non-glob) paths that do not exist
    ignored: List[str]  # side files matched by a glob


class PatternError(ValueError):
    """An input pattern that cannot be expanded (unbalanced braces)."""


def _top_level_parts(pattern: str) -> List[str]:
    """Splits on the commas outside braces: ``a/{x,y}.tar,b.tar`` -> ``a/{x,y}.tar``, ``b.tar``."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(pattern):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_patterns(patterns) -> List[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pattern in patterns:
        for part in _top_level_parts(pattern):
            try:
                out.extend(braceexpand.braceexpand(part))
            except braceexpand.UnbalancedBracesError:
                raise PatternError(f"unbalanced braces in {part!r}: write lists as {{a,b}} and ranges as "
                                   f"{{00000..00099}}") from None
    return out


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def strip_tar_suffix(filename: str) -> str:
    for suffix in sorted(TAR_SUFFIXES, key=len, reverse=True):
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def shard_name(source: str) -> str:
    name = _SAFE.sub("_", strip_tar_suffix(posixpath.basename(source)))
    return name.lstrip("._-") or "shard"


def assign_names(sources) -> List[ShardSpec]:
    """Sorted sources -> specs. Equal base names (a/00000.tar, b/00000.tar) get a hash suffix."""
    sources = sorted(set(sources))
    names = [shard_name(s) for s in sources]
    counts = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    specs = []
    for i, (src, name) in enumerate(zip(sources, names)):
        if counts[name] > 1:
            name = f"{name}-{hashlib.sha256(src.encode()).hexdigest()[:10]}"
        specs.append(ShardSpec(i, name, src))
    return specs


def plan_shards(patterns) -> ShardPlan:
    files, missing, ignored = set(), [], []
    for pattern in expand_patterns(patterns):
        try:
            metadata = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # BeamIOError when a literal path does not exist on some filesystems
            metadata = []
        if not metadata and not _has_glob(pattern):
            missing.append(pattern)
        for m in metadata:
            lower = m.path.lower()
            if lower.endswith(SIDE_FILE_SUFFIXES) and not lower.endswith(TAR_SUFFIXES):
                ignored.append(m.path)
            else:
                files.add(m.path)
    if missing:
        log.warning("%d input path(s) do not exist, e.g. %s", len(missing), missing[0])
    return ShardPlan(assign_names(files), missing, sorted(ignored))
