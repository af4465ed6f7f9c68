"""The pass infrastructure and one module per pass; the rules every pass keeps are in README.md."""

from tpc.passes.compaction import Compaction, Role, compactions, role_of
from tpc.passes.fuse_attention_scores import FuseAttentionScores
from tpc.passes.infra import Pass, PassManager, PassResult
from tpc.passes.insert_prune import InsertPrune
from tpc.passes.proportional_attention import ProportionalAttention
from tpc.registry import METHODS, get_method

__all__ = ["METHODS", "Compaction", "FuseAttentionScores", "InsertPrune", "Pass", "PassManager", "PassResult",
           "ProportionalAttention", "Role", "compactions", "get_method", "role_of"]
