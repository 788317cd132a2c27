"""Beam's S3 filesystem calls against moto's S3 server on loopback: Beam as shipped (a new boto3
client per call) against schemas/s3_clients.py (one client per process and options), side by side.

    python -m bench.s3_calls [--calls 40]

Each arm runs in its own process: exists, create + write 1 kB + close, rename; the mean per call.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

ARM = r'''
import json, sys, time
arm, endpoint, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
if arm == "shared":
    from schemas import s3_clients
    assert s3_clients.install()
FileSystems.set_options(PipelineOptions(s3_endpoint_url=endpoint, s3_access_key_id="k", s3_secret_access_key="s",
                                        s3_region_name="us-east-1"))
url = lambda k: f"s3://bench/{arm}/{k}"
out = {}
t = time.perf_counter()
for i in range(calls):
    FileSystems.exists(url(f"a{i}"))
out["exists_ms"] = (time.perf_counter() - t) / calls * 1e3
t = time.perf_counter()
for i in range(calls):
    f = FileSystems.create(url(f"a{i}")); f.write(b"x" * 1000); f.close()
out["create_write_close_ms"] = (time.perf_counter() - t) / calls * 1e3
t = time.perf_counter()
for i in range(calls):
    FileSystems.rename([url(f"a{i}")], [url(f"b{i}")])
out["rename_ms"] = (time.perf_counter() - t) / calls * 1e3
print(json.dumps(out))
'''


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args(argv)
    import boto3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                              region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        results = {}
        for arm in ("beam", "shared"):
            t = time.time()
            r = subprocess.run([sys.executable, "-c", ARM, arm, endpoint, str(args.calls)],
                               capture_output=True, text=True, check=True)
            results[arm] = json.loads(r.stdout.strip().splitlines()[-1])
            results[arm]["arm_seconds"] = round(time.time() - t, 1)
        for key in ("exists_ms", "create_write_close_ms", "rename_ms"):
            results[f"{key}_ratio"] = round(results["beam"][key] / results["shared"][key], 1)
        print(json.dumps(results, indent=1))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
