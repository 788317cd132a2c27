"""Beam step: write a PCollection of dicts to exactly one named file (Parquet or JSONL).

Beam's file sinks write temporary files and rename them when the job commits, so a job that dies
leaves no output at that name (jobs delete a stale one before they start).
"""
import json
import posixpath

import apache_beam as beam
import pyarrow as pa

from schemas import storage


def output_format(path: str, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "jsonl" if path.lower().endswith((".jsonl", ".json")) else "parquet"


def failures_path_for(output: str) -> str:
    """Default failure-record file beside an output: ``scores.parquet`` -> ``scores.failures.jsonl``."""
    return posixpath.splitext(output)[0] + ".failures.jsonl"


def remove_stale(*paths) -> None:
    storage.delete_quietly([p for p in paths if p and storage.exists(p)])


class WriteRows(beam.PTransform):
    def __init__(self, path: str, fmt: str, schema: pa.Schema = None):
        super().__init__()
        if fmt == "parquet" and schema is None:
            raise ValueError("a Parquet output needs a schema")
        self.path, self.fmt, self.schema = path, fmt, schema

    def expand(self, rows):
        if self.fmt == "jsonl":
            return (rows
                    | "ToJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False, separators=(",", ":")))
                    | "WriteJsonl" >> beam.io.WriteToText(self.path, shard_name_template="", num_shards=1))
        return rows | "WriteParquet" >> beam.io.WriteToParquet(
            self.path, self.schema, num_shards=1, shard_name_template="", codec="zstd")
