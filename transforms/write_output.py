"""Beam step: write a PCollection of dicts to exactly one named file (Parquet or JSONL).

One element (a marker, so an empty input still makes an empty file) carries the rows as an
iterable side input to one DoFn call, which streams them into a temporary file in the same
directory and renames it over the name: a job that dies leaves no output at that name (jobs delete
a stale one before they start), and a retried write just writes it again. This is what Beam's file
sinks do with num_shards=1, in one fused step instead of about ten steps and three stages (their
fixed cost was a visible part of a small rerank job). The input may be a tuple of PCollections:
they are written together without a Flatten.
"""
import itertools
import json
import posixpath

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import storage

ROWS_PER_BATCH = 8192  # rows per Arrow batch / JSONL write


def output_format(path: str, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "jsonl" if path.lower().endswith((".jsonl", ".json")) else "parquet"


def failures_path_for(output: str) -> str:
    """Default failure-record file beside an output: ``scores.parquet`` -> ``scores.failures.jsonl``."""
    return posixpath.splitext(output)[0] + ".failures.jsonl"


def remove_stale(*paths) -> None:
    storage.delete_quietly([p for p in paths if p and storage.exists(p)])


def _chunks(rows, size):
    chunk = []
    for r in rows:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_file(path: str, fmt: str, rows, schema: pa.Schema = None) -> int:
    """Streams ``rows`` (dicts) into a temp file beside ``path``, then renames it to ``path``."""
    tmp = storage.temp_path_for(path)
    n = 0
    f = storage.create(tmp)
    try:
        if fmt == "jsonl":
            for chunk in _chunks(rows, ROWS_PER_BATCH):
                f.write("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
                                for r in chunk).encode("utf-8"))
                n += len(chunk)
        else:
            with pq.ParquetWriter(pa.PythonFile(f, mode="w"), schema, compression="zstd") as writer:
                for chunk in _chunks(rows, ROWS_PER_BATCH):
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                    n += len(chunk)
        f.close()
    except BaseException:
        f.close()
        storage.delete_quietly([tmp])
        raise
    storage.commit(tmp, path)
    return n


class _WriteFile(beam.DoFn):
    def __init__(self, path: str, fmt: str, schema: pa.Schema = None):
        self.path, self.fmt, self.schema = path, fmt, schema

    def process(self, _, *parts):
        write_file(self.path, self.fmt, itertools.chain(*parts), self.schema)
        yield self.path


class WriteRows(beam.PTransform):
    """PCollection of dicts (or a tuple of them) -> the one file ``path``; outputs that path."""

    def __init__(self, path: str, fmt: str, schema: pa.Schema = None):
        super().__init__()
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"unknown output format {fmt!r}")
        if fmt == "parquet" and schema is None:
            raise ValueError("a Parquet output needs a schema")
        self.path, self.fmt, self.schema = path, fmt, schema

    def expand(self, rows):
        parts = tuple(rows) if isinstance(rows, (tuple, list)) else (rows,)
        return (parts[0].pipeline
                | "OneFile" >> beam.Create([None])
                | "WriteFile" >> beam.ParDo(_WriteFile(self.path, self.fmt, self.schema),
                                            *(beam.pvalue.AsIter(p) for p in parts)))
