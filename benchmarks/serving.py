"""Serving DeiT-S (random weights), pruned and unpruned, through the Triton server that
``nvidia-pytriton`` bundles (``tpc serve``'s Python-backend repository), against the same ONNX
files called in ONNX Runtime in this process.

For 1, 4 and 16 concurrent clients, each sending one image per request (batch 1) in a loop for
SECONDS: requests/s and the p50/p99 latency per request. In-process, the clients are threads
calling one shared session (default threads); through the server, threads with a gRPC client each, the server's
dynamic batcher forming batches of up to 32. With ``--soak S``: S seconds of 4 clients on the
pruned model with every ``--bad-every``-th request malformed (wrong shape, wrong dtype, missing
input in turn): requests served, errors (expected and not), the server's memory (resident set of
tritonserver and its Python stub) at the start and the end.

    pip install -e ".[serve]" && nice -n 19 python benchmarks/serving.py [--seconds 10] [--rounds 2] [--soak 180]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import tpc  # noqa: E402
from tpc.serving import server as triton  # noqa: E402
from tpc.serving.repository import write_repository  # noqa: E402

MODEL = "deit_small_patch16_224"
RECIPE = dict(method="topk-cls", layers=[3, 6, 9], keep=0.7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def artifacts(folder: Path) -> dict[str, Path]:
    """DeiT-S unpruned and pruned as ONNX files in ``folder`` (made once: kept files are reused)."""
    paths = {"unpruned": folder / "unpruned.onnx", "pruned": folder / "pruned.onnx"}
    if all(p.is_file() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval()
    example = (torch.randn(2, 3, 224, 224),)
    tpc.export(model, paths["unpruned"], example_inputs=example)
    tpc.export(tpc.compile(model, example, **RECIPE), paths["pruned"])
    return paths


def drive(clients: int, seconds: float, call) -> dict:
    """``clients`` threads calling ``call(client_index, request_index)`` until ``seconds`` pass."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.perf_counter() + seconds

    def loop(c: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                call(c, i)
                latencies[c].append(time.perf_counter() - start)
            except InferenceServerException:
                errors[c] += 1
            i += 1

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - begin
    done = sorted(x for per in latencies for x in per)
    q = statistics.quantiles(done, n=100) if len(done) > 1 else [done[0]] * 99
    return dict(rps=len(done) / took, p50=q[49] * 1e3, p99=q[98] * 1e3, served=len(done), errors=sum(errors),
                took=took, latencies=done)


def merge(runs: list[dict]) -> dict:
    """Several timed runs of one point as one: requests over total time, percentiles over all requests."""
    done = sorted(x for run in runs for x in run["latencies"])
    q = statistics.quantiles(done, n=100)
    return dict(rps=len(done) / sum(run["took"] for run in runs), p50=q[49] * 1e3, p99=q[98] * 1e3)


def in_process(path: Path):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    return lambda c, i: session.run(None, {name: image})


def through_server(running, model: str, clients: int, bad_every: int = 0):
    grpc = [grpcclient.InferenceServerClient(f"localhost:{running.grpc_port}") for _ in range(clients)]
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    malformed = [("x", image[:, :, :112], "FP32"), ("x", image.astype(np.float64), "FP64"), None]

    def call(c: int, i: int):
        sent = (image, "FP32")
        name = "x"  # the ONNX input is named after timm's forward argument
        if bad_every and i % bad_every == bad_every - 1:
            bad = malformed[(i // bad_every) % len(malformed)]
            call.bad += 1
            if bad is None:
                return grpc[c].infer(model, [])  # missing input
            name, *sent = bad
        x = grpcclient.InferInput(name, list(sent[0].shape), sent[1])
        x.set_data_from_numpy(sent[0])
        return grpc[c].infer(model, [x])

    call.bad = 0
    return call


def server_rss_mib(running) -> float:
    """Resident memory of the server and every process below it (its Python stubs)."""
    total, todo = 0, [running.process.pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
            todo += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each point")
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of the load test with bad requests (0: none)")
    parser.add_argument("--bad-every", type=int, default=10)
    parser.add_argument("--artifacts", help="folder that keeps the two ONNX files between runs (default: a temporary one)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        paths = artifacts(Path(args.artifacts or folder))
        repo = Path(folder) / "repo"
        for name, path in paths.items():
            write_repository(path, repo, name, backend="python", max_batch=32)
        running = triton.start(repo, free_port(), free_port(), free_port())
        try:
            print("| clients | model | in-process req/s | p50 ms | p99 ms | server req/s | p50 ms | p99 ms |")
            print("|---|---|---|---|---|---|---|---|")
            for clients in map(int, args.clients.split(",")):
                rows = {}
                for model in ("unpruned", "pruned"):  # warm-up: sessions, the server's batcher, the clients
                    drive(clients, 2.0, in_process(paths[model]))
                    drive(clients, 2.0, through_server(running, model, clients))
                for r in range(args.rounds):  # interleaved, the order rotating: load from other jobs hits all four alike
                    order = [("unpruned", "local"), ("pruned", "local"), ("unpruned", "server"), ("pruned", "server")]
                    for model, where in order[r % 4:] + order[:r % 4]:
                        call = in_process(paths[model]) if where == "local" else through_server(running, model, clients)
                        rows.setdefault((model, where), []).append(drive(clients, args.seconds, call))
                merged = {key: merge(runs) for key, runs in rows.items()}
                for model in ("unpruned", "pruned"):
                    local, served = merged[model, "local"], merged[model, "server"]
                    print(f"| {clients} | {model} | {local['rps']:.1f} | {local['p50']:.0f} | {local['p99']:.0f} | "
                          f"{served['rps']:.1f} | {served['p50']:.0f} | {served['p99']:.0f} |", flush=True)
                ratio_local = merged["pruned", "local"]["rps"] / merged["unpruned", "local"]["rps"]
                ratio_served = merged["pruned", "server"]["rps"] / merged["unpruned", "server"]["rps"]
                print(f"| {clients} | pruned/unpruned | {ratio_local:.2f}x | | | {ratio_served:.2f}x | | |", flush=True)
            if args.soak:
                start_rss = server_rss_mib(running)
                call = through_server(running, "pruned", 4, args.bad_every)
                result = drive(4, args.soak, call)
                print(f"soak {args.soak:.0f} s, 4 clients, every {args.bad_every}th request malformed: "
                      f"{result['served']} served ({result['rps']:.1f}/s, p50 {result['p50']:.0f} ms, p99 "
                      f"{result['p99']:.0f} ms), {result['errors']} errors for {call.bad} malformed requests; "
                      f"server RSS {start_rss:.0f} MiB at the "
                      f"start, {server_rss_mib(running):.0f} MiB at the end; ready: {running.ready()}")
        finally:
            running.stop()
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
