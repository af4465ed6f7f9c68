"""The Triton Python-backend model ``tpc export --backend python`` writes (tpc/serving/triton_model.py),
run in this process on a real ONNX Runtime session: how it splits the requests the dynamic batcher
hands it together. The server passes requests to ``execute`` as it likes, so tests/test_serving.py
cannot force a bad request into a batch; here the batch is given. ``triton_python_backend_utils``
exists only inside the server's stub: the few names the model uses stand in for it.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tpc.serving.repository import MODEL_PY

VOCAB, WIDTH = 10, 3


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors, error


class _Request:
    def __init__(self, **arrays):
        self.arrays = arrays


@pytest.fixture
def model(tmp_path, monkeypatch):
    """The python-backend model over an embedding lookup (Gather: ids past the table are refused)."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [VOCAB, WIDTH],
                               np.arange(VOCAB * WIDTH, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["out"])], "lookup",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "length"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "length", WIDTH])],
                              [table])
    (tmp_path / "1").mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "1" / "model.onnx")
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor, utils.InferenceResponse, utils.TritonError = _Tensor, _Response, str
    utils.get_input_tensor_by_name = lambda request, name: _Tensor(name, request.arrays[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    spec = importlib.util.spec_from_file_location("model", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    served = module.TritonPythonModel()
    served.initialize({"model_repository": str(tmp_path), "model_version": "1"})
    return served


def test_each_request_of_a_batch_gets_its_own_rows(model):
    ids = [np.array([[1, 2, 3]]), np.array([[4, 5, 6], [7, 8, 9]]), np.array([[0, 1]]), np.array([[9, 9, 9]])]
    responses = model.execute([_Request(ids=i) for i in ids])
    for i, response in zip(ids, responses):
        assert response.error is None
        (out,) = response.output_tensors
        assert out.name == "out" and np.array_equal(out.array, np.arange(VOCAB * WIDTH, dtype=np.float32)
                                                   .reshape(VOCAB, WIDTH)[i])


def test_a_bad_request_in_a_batch_fails_alone(model):
    """ONNX Runtime refuses the whole batch holding an id past the table; each request then runs alone."""
    ids = [np.array([[1, 2, 3]]), np.array([[4, VOCAB + 5, 6]]), np.array([[7, 8, 9], [0, 0, 0]])]
    responses = model.execute([_Request(ids=i) for i in ids])
    assert responses[1].output_tensors is None and "out of" in responses[1].error.lower()
    for k in (0, 2):
        assert responses[k].error is None
        assert np.array_equal(responses[k].output_tensors[0].array,
                              np.arange(VOCAB * WIDTH, dtype=np.float32).reshape(VOCAB, WIDTH)[ids[k]])
