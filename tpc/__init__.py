"""tpc: a token pruning compiler for transformers.

    import tpc, timm
    m = timm.create_model("deit_tiny_patch16_224")
    pm = tpc.compile(m, method="topk-cls", layers=[3, 6, 9], keep=0.7)   # an nn.Module
    tpc.export(pm, "deit_tiny_pruned.onnx")
"""

from tpc import kernels  # noqa: F401  (registers the tpc:: ops before anything uses them)
from tpc.api import compile, export, inspect
from tpc.errors import TpcError, TpcInternalError
from tpc.version import __version__

__all__ = ["TpcError", "TpcInternalError", "__version__", "compile", "export", "inspect"]
