"""Real object-store servers on loopback for the tests: moto's S3 server and the GCS emulator,
each started as its own process, plus the few client calls a test needs (upload, read, list,
overwrite) made with the stores' own client libraries, not through the code under test."""
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
KEY, SECRET, REGION = "edje-test-key", "edje-test-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Server:
    """A server process; ``stop()`` ends it."""

    def __init__(self, cmd, port, env=None):
        self.port = port
        # The log goes to a file: a pipe nobody reads fills up and blocks the server mid-request.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        wait_listening(port, self.proc)

    def log_tail(self, n=2000) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-n:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class S3Store:
    """A bucket on a moto S3 server. ``flags`` are Beam's S3 options for every job."""
    scheme = "s3"

    def __init__(self, port: int):
        import boto3
        self.endpoint = f"http://127.0.0.1:{port}"
        self.bucket = f"edje-{uuid.uuid4().hex[:10]}"
        self.flags = [f"--s3_endpoint_url={self.endpoint}", f"--s3_access_key_id={KEY}",
                      f"--s3_secret_access_key={SECRET}", f"--s3_region_name={REGION}"]
        self.options = {"s3_endpoint_url": self.endpoint, "s3_access_key_id": KEY,
                        "s3_secret_access_key": SECRET, "s3_region_name": REGION}
        self.env = {}
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                                   aws_secret_access_key=SECRET, region_name=REGION)
        self.client.create_bucket(Bucket=self.bucket)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = ""):
        out, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.client.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = page["NextContinuationToken"]


class GcsStore:
    """A bucket on the GCS emulator, which Beam's GCS client finds through STORAGE_EMULATOR_HOST."""
    scheme = "gs"

    def __init__(self, port: int):
        from google.cloud import storage
        self.env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}  # the fixture sets it here too
        self.bucket = f"edje-{uuid.uuid4().hex[:10]}"
        self.flags, self.options = [], None
        self.client = storage.Client.create_anonymous_client()
        self.client.create_bucket(self.bucket)

    def url(self, key: str) -> str:
        return f"gs://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.client.bucket(self.bucket).blob(key).upload_from_string(data)

    def get(self, key: str) -> bytes:
        return self.client.bucket(self.bucket).blob(key).download_as_bytes()

    def keys(self, prefix: str = ""):
        return sorted(b.name for b in self.client.list_blobs(self.bucket, prefix=prefix))


def start_s3() -> Server:
    port = free_port()
    return Server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port)


def start_gcs() -> Server:
    port = free_port()
    return Server([str(BIN / "gcp-storage-emulator"), "start", "--host=127.0.0.1", f"--port={port}",
                   "--in-memory"], port, env={"STORAGE_EMULATOR_HOST": ""})
