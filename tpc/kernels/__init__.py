"""``tpc::`` custom ops: the contract between the passes and every backend.

Each op is a ``torch.library.custom_op`` with a reference implementation (plain torch, any
device), a fake implementation for shape propagation, and an ONNX translation in
:mod:`tpc.exports.onnx`. Importing this package registers them.
"""

from tpc.kernels import cuda, ops  # noqa: F401  (registers the ops)
from tpc.kernels.ops import OPS

TRITON_ON_CUDA = cuda.register()

__all__ = ["OPS"]
