"""A toy pruning method registered the way a new method is: one registry entry and its
implementations. It keeps the tokens whose features have the largest L2 norm, on an
encoder's stream and on a VLM's visual tokens before the language model, and nowhere else.

Imported by conftest.py when TPC_TOY_METHOD is set, so ``test_registry.py`` can check that
every test that runs "each method that applies here" picks it up, and only there.
"""

from __future__ import annotations

import torch

from tpc.passes.compaction import Builder, Role
from tpc.passes.prune_methods import PruneContext, gather, key_valid, select
from tpc.registry import METHODS, Kind, PruneMethod, Where, register

NAME = "toy-norm"
aten = torch.ops.aten


def build(b: Builder, ctx: PruneContext):
    scores = b.op(aten.linalg_vector_norm.default, ctx.stream, 2, [-1], role=Role.SCORING)
    if ctx.site.mask is not None:  # padding ranks below every real token
        scores = b.op(aten.where.ScalarOther, key_valid(b, ctx.site), scores, -1.0, role=Role.SCORING)
    return gather(b, ctx, select(b, ctx, scores))


def choose(b: Builder, ctx) -> torch.fx.Node:
    features = b.op(torch.ops.tpc.gather_axis.default, ctx.stream, ctx.pos, 1, role=Role.GATHER)
    scores = b.op(aten.linalg_vector_norm.default, features, 2, [-1], role=Role.SCORING)
    return b.op(torch.ops.tpc.select_topk.default, scores, ctx.keep, 0, role=Role.SELECTION)


if NAME not in METHODS:
    register(PruneMethod(NAME, "a test's toy", "keep the tokens of largest feature norm", Kind.SELECT, "norm",
                         {Where.ENCODER: build, Where.VISUAL_BEFORE_LM: choose}))
