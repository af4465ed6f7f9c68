"""Triton Python-backend model written by ``tpc export --triton-repo … --backend python``:
runs ``model.onnx`` beside it in ONNX Runtime.

Standalone on purpose (the server's Python stub imports it as ``model.py``, without tpc).
Requests that the dynamic batcher hands over together are concatenated along the batch axis
when their shapes agree (a text encoder's requests may differ in length), run once, and split
back. When ONNX Runtime refuses a batch of several requests, each is run alone, so only the
request at fault gets an error response.
"""

import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        threads = int(os.environ.get("TPC_SERVE_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs] for r in requests]
        responses = [None] * len(requests)
        groups = {}
        for i, feeds in enumerate(arrays):
            groups.setdefault(tuple((a.dtype.str, a.shape[1:]) for a in feeds), []).append(i)
        for members in groups.values():
            self._run(arrays, members, responses)
        return responses

    def _run(self, arrays, members, responses):
        try:
            feeds = {name: np.concatenate([arrays[i][k] for i in members]) for k, name in enumerate(self.inputs)}
            results = self.session.run(self.outputs, feeds)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's refusal goes back to the client
            if len(members) > 1:
                for i in members:
                    self._run(arrays, [i], responses)
            else:
                responses[members[0]] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
            return
        stops = np.cumsum([arrays[i][0].shape[0] for i in members])
        for i, stop in zip(members, stops):
            start = stop - arrays[i][0].shape[0]
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop]))
                       for name, out in zip(self.outputs, results)]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
