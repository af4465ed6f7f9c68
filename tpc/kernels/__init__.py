"""``tpc::`` custom ops: the contract between the passes and every backend.

Each op is a ``torch.library.custom_op`` with a reference implementation (plain torch, any
device), a fake implementation for shape propagation, and an ONNX translation in
:mod:`tpc.exports.onnx_ops`. Importing this package registers them.
"""

from tpc.kernels import cuda, ops  # noqa: F401  (registers the ops)

cuda.register()
