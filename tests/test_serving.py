"""Serving through a real Triton server: the one nvidia-pytriton bundles, on free localhost ports.

One server per module serves a pruned tiny ViT and a pruned tiny BERT at a dynamic length
(Python backend: ONNX Runtime in the server's stub). Outputs through it equal the artifact run
in ONNX Runtime directly, at batch 1 and under dynamic batching with concurrent clients; bad
requests get errors and the server goes on; ``tpc serve`` stops on Ctrl-C and SIGTERM leaving
no process, folder or shared memory; config.pbtxt of both flavours matches the artifact.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("pytriton", reason='needs the Triton server of the serve extra: pip install -e ".[serve]"')
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import tpc  # noqa: E402
from models import image_inputs  # noqa: E402
from test_dynamic_length import batch as token_batch  # noqa: E402
from test_dynamic_length import encoder  # noqa: E402
from tpc.serving import server as triton  # noqa: E402
from tpc.serving.repository import TRITON_DTYPES, write_repository  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_onnx(tmp_path_factory) -> Path:
    """An ONNX file with a batch axis (y = relu(x), [batch, 4]): what the refusals before any serving need."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "small", [x], [y])
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)
    return path


@pytest.fixture(scope="session")
def artifacts(exported, tmp_path_factory) -> dict[str, Path]:
    """The pruned tiny ViT (the suite's shared artifact) and a pruned tiny BERT (any length) as ONNX files,
    exported once per worker."""
    bert = tpc.compile(encoder(), token_batch([16, 11], 16), method="topk-cls", layers=[0, 1], keep=0.5)
    paths = {"vit": exported("timm_vit", "topk-cls")[1], "bert": tmp_path_factory.mktemp("artifacts") / "bert.onnx"}
    tpc.export(bert, paths["bert"])
    return paths


@pytest.fixture(scope="module")
def served(artifacts, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for name, path in artifacts.items():
        # 0.2 s for a batch to fill: the concurrent-clients test must see batching even on loaded cores
        write_repository(path, repo, name, backend="python", max_batch=8, queue_delay_us=200_000)
    running = triton.start(repo, free_port(), free_port(), free_port())
    running.http_clients = []
    yield running
    for client in running.http_clients:
        client.close()  # an open keep-alive connection holds the server's exit until its timeout
    running.stop()


def http_client(served):
    """An HTTP client of the module's server, closed before the server stops."""
    client = httpclient.InferenceServerClient(f"localhost:{served.http_port}")
    served.http_clients.append(client)
    return client


class Direct:
    """The artifact in ONNX Runtime, in this process: what the server must reproduce."""

    def __init__(self, path: Path):
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name

    def __call__(self, *arrays):
        return self.session.run([self.output], dict(zip(self.inputs, arrays)))[0]


def infer(client, module, name: str, direct: Direct, *arrays, dtypes=None):
    inputs = []
    for k, (input_name, a) in enumerate(zip(direct.inputs, arrays)):
        x = module.InferInput(input_name, list(a.shape), (dtypes or {}).get(k, "FP32" if a.dtype == np.float32 else "INT64"))
        x.set_data_from_numpy(a)
        inputs.append(x)
    return client.infer(name, inputs).as_numpy(direct.output)


def vit_images(batch: int, seed: int) -> np.ndarray:
    return image_inputs(batch, seed)[0].numpy()


def bert_tokens(reals: list[int], length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return tuple(t.numpy() for t in token_batch(reals, length, seed))


@pytest.mark.slow
def test_outputs_through_the_server_equal_onnxruntime_at_batch_1(served, artifacts):
    client = http_client(served)
    vit = Direct(artifacts["vit"])
    x = vit_images(1, seed=3)
    np.testing.assert_allclose(infer(client, httpclient, "vit", vit, x), vit(x), rtol=0, atol=1e-5)
    bert = Direct(artifacts["bert"])
    for length in (5, 16, 40):  # one artifact, every length up to the position table
        ids, mask = bert_tokens([length - 2], length, seed=length)
        np.testing.assert_allclose(infer(client, httpclient, "bert", bert, ids, mask), bert(ids, mask), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_dynamic_batching_with_concurrent_clients_keeps_every_output(served, artifacts):
    """24 clients at once over gRPC: the server batches them (fewer executions than requests),
    and each gets what ONNX Runtime gives for its own input; BERT requests of different lengths
    are batched only with their own length."""
    vit, bert = Direct(artifacts["vit"]), Direct(artifacts["bert"])
    jobs = [("vit", vit, (vit_images(1 + i % 2, seed=10 + i),)) for i in range(12)]
    jobs += [("bert", bert, bert_tokens([4 + i % 5, 3], (8, 12)[i % 2], seed=i)) for i in range(12)]
    before = _executions(served)

    clients = [grpcclient.InferenceServerClient(f"localhost:{served.grpc_port}") for _ in jobs]
    together = threading.Barrier(len(jobs))

    def call(job, client):
        name, direct, arrays = job
        together.wait()
        return infer(client, grpcclient, name, direct, *arrays)

    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(call, jobs, clients))
    for client in clients:
        client.close()
    for (name, direct, arrays), out in zip(jobs, outputs):
        np.testing.assert_allclose(out, direct(*arrays), rtol=0, atol=1e-5, err_msg=name)
    after = _executions(served)
    requests = sum(after[m][0] - before[m][0] for m in after)
    executions = sum(after[m][1] - before[m][1] for m in after)
    assert requests == len(jobs) and executions < requests, (requests, executions)


def _executions(served) -> dict[str, tuple[int, int]]:
    """Per model: (requests answered, model executions) from the server's statistics."""
    stats = http_client(served).get_inference_statistics()
    return {m["name"]: (int(m["inference_stats"]["success"]["count"]), int(m["execution_count"]))
            for m in stats["model_stats"]}


@pytest.mark.slow
def test_malformed_requests_get_errors_and_the_server_goes_on(served, artifacts):
    client = http_client(served)
    vit, bert = Direct(artifacts["vit"]), Direct(artifacts["bert"])
    x = vit_images(1, seed=5)
    ids, mask = bert_tokens([6], 8, seed=1)
    bad = {
        "wrong shape": lambda: infer(client, httpclient, "vit", vit, vit_images(1, 5)[:, :, :16]),
        "wrong dtype": lambda: infer(client, httpclient, "vit", vit, x.astype(np.float64), dtypes={0: "FP64"}),
        "missing input": lambda: infer(client, httpclient, "bert", bert, ids),
        "batch over max_batch": lambda: infer(client, httpclient, "vit", vit, vit_images(9, 5)),
        "token id past the vocabulary": lambda: infer(client, httpclient, "bert", bert, ids + 1000, mask),
        "unknown model": lambda: infer(client, httpclient, "vit-nope", vit, x),
    }
    for what, request in bad.items():
        with pytest.raises(InferenceServerException) as err:
            request()
        assert str(err.value), what
        np.testing.assert_allclose(infer(client, httpclient, "vit", vit, x), vit(x), rtol=0, atol=1e-5, err_msg=what)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": "not numbers"}]}).encode()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{served.url}/v2/models/vit/infer", body), timeout=10)
    assert err.value.code >= 400
    assert served.ready()


@pytest.mark.slow
def test_a_bad_request_batched_with_good_ones_fails_alone(served, artifacts):
    """ONNX Runtime refuses the batch holding an out-of-vocabulary id; the Python model then
    runs each request alone, so only that request gets the error."""
    bert = Direct(artifacts["bert"])
    jobs = [bert_tokens([5], 8, seed=i) for i in range(8)]
    jobs[3] = (jobs[3][0] + 1000, jobs[3][1])

    clients = [http_client(served) for _ in jobs]

    def call(arrays, client):
        try:
            return infer(client, httpclient, "bert", bert, *arrays)
        except InferenceServerException as err:
            return err

    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(call, jobs, clients))
    assert isinstance(outputs[3], InferenceServerException)
    for i, (arrays, out) in enumerate(zip(jobs, outputs)):
        if i != 3:
            np.testing.assert_allclose(out, bert(*arrays), rtol=0, atol=1e-5)


def _parsed(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _check_against_artifact(config: model_config_pb2.ModelConfig, artifact: Path) -> None:
    graph = onnx.load(artifact).graph
    weights = {t.name for t in graph.initializer}
    for declared, values in ((config.input, [v for v in graph.input if v.name not in weights]), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for t, v in zip(declared, values):
            assert model_config_pb2.DataType.Name(t.data_type) == TRITON_DTYPES[v.type.tensor_type.elem_type]
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            assert shape[0] == -1 and list(t.dims) == shape[1:]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_config_pbtxt_matches_the_artifact_signature(backend, artifacts, tmp_path):
    for name, path in artifacts.items():
        folder = write_repository(path, tmp_path, name, backend=backend, max_batch=16)
        config = _parsed((folder / "config.pbtxt").read_text())
        assert config.name == name and config.max_batch_size == 16 and config.backend == backend
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
        _check_against_artifact(config, path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert files == (["1/model.onnx", "1/model.py", "config.pbtxt"] if backend == "python"
                         else ["1/model.onnx", "config.pbtxt"])
        assert (folder / "1" / "model.onnx").read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "vit"]  # no partial folder left


@pytest.mark.slow
def test_the_server_loads_the_config_as_written(served, artifacts):
    client = grpcclient.InferenceServerClient(f"localhost:{served.grpc_port}")
    for name, path in artifacts.items():
        config = client.get_model_config(name).config
        assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 200_000
        _check_against_artifact(config, path)


@pytest.mark.slow
def test_export_cli_writes_a_repository_and_refuses_to_overwrite(artifacts, tmp_path, cli):
    repo = tmp_path / "models"
    done = cli("export", artifacts["vit"], "--triton-repo", repo, "--name", "deit")
    assert done.returncode == 0 and done.stdout.startswith(f"wrote {repo / 'deit'}")
    before = (repo / "deit" / "config.pbtxt").read_text()
    done = cli("export", artifacts["bert"], "--triton-repo", repo, "--name", "deit")
    assert done.returncode == 1 and "already exists" in done.stderr
    assert (repo / "deit" / "config.pbtxt").read_text() == before
    not_onnx = tmp_path / "model.pt2"
    not_onnx.write_bytes(b"")
    done = cli("export", not_onnx, "--triton-repo", tmp_path / "new")
    assert done.returncode == 1 and "not an ONNX artifact" in done.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["deit"] and not (tmp_path / "new").exists()


def test_serve_without_the_extra_says_what_to_install(small_onnx, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "pytriton", None)  # as if nvidia-pytriton were not installed
    done = cli("serve", small_onnx)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and 'pip install "tpc[serve]"' in done.stderr


def test_serve_on_a_busy_port_says_which_and_starts_nothing(small_onnx, tmp_path, monkeypatch, cli):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where tpc serve makes its folder
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = cli("serve", small_onnx, "--grpc-port", port)
    assert done.returncode == 1 and done.stderr.startswith(f"tpc: error: --grpc-port {port}: cannot listen")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ports, words", [(["--port", "99999"], "--port 99999: a port is a number from 1 to 65535"),
                                           (["--port", "8123", "--metrics-port", "8123"], "are both 8123")])
def test_serve_on_an_impossible_port_says_so_in_one_line(small_onnx, cli, ports, words):
    done = cli("serve", small_onnx, *ports)
    assert done.returncode == 1 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_export_where_nothing_can_be_written_says_so_in_one_line(small_onnx, cli):
    done = cli("export", small_onnx, "--triton-repo", "/proc/tpc-repo")  # /proc takes no new folders
    assert done.returncode == 1 and "cannot write the model repository '/proc/tpc-repo'" in done.stderr


def _descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_tpc_serve_answers_plain_http_json_and_stops_leaving_nothing(stop, artifacts, tmp_path):
    """`tpc serve` in its own process: its curl line's request answers; after Ctrl-C or SIGTERM
    it exits 0, and its server, stub processes, temporary folder and shared memory are gone."""
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "tpc", "serve", str(artifacts["vit"]), "--name", "vit", "--port", str(port),
               "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = process.stdout.readline()
        assert banner.startswith("serving"), banner + process.stderr.read()
        curl = process.stdout.readline()
        body = subprocess.run(curl.split(" | ")[0], shell=True, capture_output=True, check=True).stdout
        request = urllib.request.Request(f"http://localhost:{port}/v2/models/vit/infer", body)
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        x = np.zeros((1, 3, 32, 32), np.float32)
        np.testing.assert_allclose(answer["outputs"][0]["data"], Direct(artifacts["vit"])(x)[0], rtol=0, atol=1e-5)
        children = _descendants(process.pid)
        assert len(list(tmp_path.glob("tpc-serve-*"))) == 1  # its repository, backend folder and log
        assert len(children) >= 2  # tritonserver and the model's Python stub
        process.send_signal(stop)
        assert process.wait(60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(0.2)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not list(tmp_path.glob("tpc-serve-*"))
    assert not list(Path("/dev/shm").glob(f"tpc{process.pid}x*"))
