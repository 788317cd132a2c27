"""File access for the store through Beam's FileSystems (local paths, gs://, s3://, hdfs://)."""
import hashlib
import json
import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from schemas import s3_clients
from schemas.token_store import PARQUET_WRITE_OPTIONS

s3_clients.install()

TMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20


def set_filesystem_options(options) -> None:
    """Gives Beam's FileSystems the object-store options (S3 endpoint and keys, GCS project...).

    ``options``: PipelineOptions, a dict of Beam option names (``{"s3_endpoint_url": ...}``) or
    None (keeps options already set, else sets empty ones: Beam's S3 filesystem refuses to run
    with none, and boto3 then takes its usual environment). Process-wide, as Beam's own Pipeline
    sets them; jobs call this before they list a single file, Beam workers get the pipeline's
    options from Beam itself.
    """
    if options is None:
        if getattr(FileSystems, "_pipeline_options", None) is None:
            FileSystems.set_options(PipelineOptions([]))
        return
    if isinstance(options, dict):
        options = PipelineOptions(**options)
    if not isinstance(options, PipelineOptions):
        raise TypeError(f"filesystem_options must be PipelineOptions or a dict, got {type(options).__name__}")
    FileSystems.set_options(options)


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
    """Puts the complete ``temp_path`` in place as ``final_path``, replacing it in one step.

    POSIX rename replaces atomically; on GCS and S3 Beam's rename is a copy (which overwrites an
    object whole) plus a delete of the temp. Only a filesystem that refuses to rename over an
    existing file (HDFS) gets delete-then-rename; the manifest's versions cover that gap.
    """
    try:
        FileSystems.rename([temp_path], [final_path])
    except BeamIOError:
        if not (FileSystems.exists(final_path) and FileSystems.exists(temp_path)):
            raise
        FileSystems.delete([final_path])
        FileSystems.rename([temp_path], [final_path])


def create(path: str) -> "_HashingWriter":
    """A write channel for ``path`` (hashing and counting what passes; empty files work on S3 too)."""
    return _HashingWriter(FileSystems.create(path, mime_type="application/octet-stream",
                                             compression_type=CompressionTypes.UNCOMPRESSED))


def make_dirs(path: str) -> None:
    """Creates a local directory and its parents; object stores have no directories."""
    if "://" not in path:
        os.makedirs(path, exist_ok=True)


def write_bytes_atomic(final_path: str, data: bytes) -> None:
    tmp = temp_path_for(final_path)
    f = create(tmp)
    try:
        f.write(data)
    finally:
        f.close()
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


def _add_empty_s3_part(raw) -> None:
    """Beam's S3 writer ends an empty file with a multipart upload of no parts, which S3 refuses
    (MalformedXML); one empty part makes it an empty object. Other filesystems: nothing to do."""
    uploader = getattr(getattr(raw, "raw", None), "_uploader", None)
    if uploader is not None and hasattr(uploader, "_write_to_s3") and not getattr(uploader, "parts", True):
        uploader._write_to_s3(b"")


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
            if self.size == 0:
                _add_empty_s3_part(self.raw)
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
    sink = create(tmp)
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
