"""The pass infrastructure and one module per pass; the rules every pass keeps are in README.md."""

from tpc.passes.cleanup import Cleanup
from tpc.passes.infra import Pass, PassManager, PassResult
from tpc.passes.insert_prune import InsertPrune
from tpc.passes.propagate_token_axis import PropagateTokenAxis
from tpc.passes.proportional_attention import ProportionalAttention
from tpc.passes.prune_methods import METHODS, get_method

__all__ = ["METHODS", "Cleanup", "InsertPrune", "Pass", "PassManager", "PassResult", "PropagateTokenAxis",
           "ProportionalAttention", "get_method"]
