"""File access for the store through Beam's FileSystems (local paths, gs://, s3://, hdfs://)."""
import hashlib
import json
import posixpath
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from schemas.token_store import PARQUET_WRITE_OPTIONS

TMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def open_read(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str, max_bytes: int) -> bytes:
    """Reads a whole small file, refusing one larger than ``max_bytes``."""
    with open_read(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than the {max_bytes}-byte limit for this kind of file")
    return data


def read_json(path: str, max_bytes: int):
    data = read_bytes(path, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from e


def temp_path_for(final_path: str) -> str:
    """A unique temporary name in the same directory (so the rename stays in one filesystem)."""
    directory, name = posixpath.split(final_path)
    return FileSystems.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")


def commit(temp_path: str, final_path: str) -> None:
    """Renames ``temp_path`` over ``final_path`` (atomic on POSIX; objects appear whole on GCS/S3)."""
    if FileSystems.exists(final_path):
        FileSystems.delete([final_path])
    FileSystems.rename([temp_path], [final_path])


def write_bytes_atomic(final_path: str, data: bytes) -> None:
    tmp = temp_path_for(final_path)
    with FileSystems.create(tmp, mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    commit(tmp, final_path)


def write_json_atomic(final_path: str, obj) -> None:
    write_bytes_atomic(final_path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def sha256_and_size(path: str):
    h = hashlib.sha256()
    n = 0
    with open_read(path) as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def list_dir(directory: str):
    """Full paths of the files directly under ``directory`` (empty if it does not exist)."""
    pattern = FileSystems.join(directory, "*")
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # Beam raises BeamIOError when nothing matches on some filesystems
        return []
    prefix = directory.rstrip("/") + "/"
    return sorted(m.path for m in result.metadata_list if "/" not in m.path[len(prefix):])


def delete_quietly(paths) -> None:
    for p in paths:
        try:
            FileSystems.delete([p])
        except Exception:
            pass


class _HashingWriter:
    """File-like wrapper: hashes and counts bytes as they are written (no second read)."""

    def __init__(self, raw):
        self.raw, self.sha, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data):
        data = bytes(data)
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self):
        return self.size

    def flush(self):
        self.raw.flush()

    def close(self):
        if not self.closed:
            self.raw.close()
            self.closed = True

    def writable(self):
        return True

    def seekable(self):
        return False


def write_parquet_atomic(final_path, schema, batches, row_group_size, commit_if=None):
    """Streams record batches into a temp file, then renames it; returns {bytes, sha256}.

    ``commit_if``: called once the file is complete; if it returns False the temp file is
    deleted instead of renamed (and None is returned)."""
    tmp = temp_path_for(final_path)
    raw = FileSystems.create(tmp, mime_type="application/octet-stream",
                             compression_type=CompressionTypes.UNCOMPRESSED)
    sink = _HashingWriter(raw)
    try:
        with pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, **PARQUET_WRITE_OPTIONS) as writer:
            for batch in batches:
                writer.write_table(pa.Table.from_batches([batch], schema), row_group_size=row_group_size)
    except BaseException:
        sink.close()
        delete_quietly([tmp])
        raise
    sink.close()
    if commit_if is not None and not commit_if():
        delete_quietly([tmp])
        return None
    commit(tmp, final_path)
    return {"bytes": sink.size, "sha256": sink.sha.hexdigest()}
