"""``tpc serve``: an ONNX artifact behind the Triton server that ``nvidia-pytriton`` bundles.

The model repository (Python backend: ONNX Runtime in the server's Python stub) and the
server's backend folder and log live in one temporary folder; Ctrl-C or SIGTERM stops the
server and its stub processes and removes that folder.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tpc.errors import TpcError
from tpc.serving import server
from tpc.serving.repository import Signature, signature, write_repository
from tpc.signals import Terminated


def curl_example(sig: Signature, name: str, port: int) -> str:
    """One shell line that sends zeros of the right shape (length 8 where it is free) and prints the outputs."""
    inputs = []
    for t in sig.inputs:
        shape = [1] + [8 if d == -1 else d for d in t.dims]
        zero = "0.0" if "FP" in t.dtype or "BF" in t.dtype else ("False" if t.dtype == "TYPE_BOOL" else "0")
        inputs.append(f'{{"name":"{t.name}","shape":{json.dumps(shape)},"datatype":"{t.dtype.removeprefix("TYPE_")}",'
                      f'"data":[{zero}]*{math.prod(shape)}}}')
    body = f'import json;print(json.dumps({{"inputs":[{",".join(inputs)}]}}))'
    return f"python3 -c '{body}' | curl -s -d @- http://localhost:{port}/v2/models/{name}/infer"


def run(args) -> int:
    return serve(args.artifact, name=args.name, http_port=args.port, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port, max_batch=args.max_batch)


def serve(artifact: str, name: str | None = None, http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, max_batch: int = 32) -> int:
    server.bundled_server()  # one line saying what to install, before any work
    name = name or Path(artifact).stem
    workdir = Path(tempfile.mkdtemp(prefix="tpc-serve-"))
    try:
        folder = write_repository(artifact, workdir / "models", name, backend="python", max_batch=max_batch)
        running = server.start(workdir / "models", http_port, grpc_port, metrics_port, workdir=workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        sig = signature(folder / "1" / "model.onnx")
        print(f"serving {artifact} as {name!r}: HTTP {running.url}/v2/models/{name}, gRPC localhost:{grpc_port}, "
              f"metrics http://localhost:{metrics_port}/metrics (Ctrl-C stops)")
        print(curl_example(sig, name, http_port), flush=True)
        while running.process.poll() is None:
            time.sleep(0.5)
        raise TpcError(f"tritonserver exited with code {running.process.returncode}:\n{running.log_tail()}")
    except (KeyboardInterrupt, Terminated):
        print("tpc: stopping the server", file=sys.stderr, flush=True)
        return 0
    finally:
        running.stop()
