"""Beam's Python worker pool, bound to one address (scripts/flink_local.sh starts one per TaskManager).

    python scripts/beam_worker_pool.py --address 127.0.0.11:50000

Beam's own ``worker_pool_main`` binds ``[::]:PORT`` with SO_REUSEPORT, so two pools on one host
would share a port and take each other's TaskManagers' workers. Bound to the TaskManager's own
loopback address, each TaskManager's ``localhost:PORT`` is its own pool, as with a sidecar pool per
TaskManager pod on Kubernetes. The pool starts one SDK harness process per StartWorker request,
with the ``python`` first on PATH (the project's .venv).
"""
import argparse
import logging
import signal
import sys
import threading

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer, kill_process_gracefully
from apache_beam.utils import thread_pool_executor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="HOST:PORT to listen on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                         options=[("grpc.so_reuseport", 0),
                                  ("grpc.http2.max_pings_without_data", 0),
                                  ("grpc.http2.max_ping_strikes", 0)])
    pool = BeamFnExternalWorkerPoolServicer(use_process=True)
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    if server.add_insecure_port(args.address) == 0:
        print(f"beam_worker_pool: cannot listen on {args.address}", file=sys.stderr)
        return 1
    server.start()
    logging.info("Beam worker pool listening on %s", args.address)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(2)
    for worker in list(pool._worker_processes.values()):
        kill_process_gracefully(worker, timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
