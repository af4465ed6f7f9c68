"""Evaluating many recipes on one captured model, cheaply.

- The model is captured once (dead code removed, as the passes remove it from every pruned
  graph); each candidate prunes a copy of that graph (the graph is copied, the parameters
  are shared).
- Work before the first pruned layer is shared: the unpruned graph runs once per batch up to
  a candidate's *cut* (the first node where its graph differs from the unpruned one), the
  values that cross the cut are kept, and each candidate runs only from its cut on
  (``fx.Interpreter`` with those values as its initial environment).
- Shape propagation is shared too: the captured graph's fake values are refreshed once, and a
  candidate's passes recompute only the nodes their rewrite changed (about a fifth less compile
  time per candidate on the CIFAR ViT).
- Outputs are compared per example, so a candidate scored on the first n examples extends to
  more examples without recomputing (successive halving in ``search.py`` relies on that).
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from tpc.pipeline import analyze, prefix_of, prune_graph
from tpc.compiled import TpcModule
from tpc.passes.cleanup import refresh_meta
from tpc.recipe import Step
from tpc.tune.data import TuneData
from tpc.tune.metrics import first_tensor


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph and the same parameters (no weights copied)."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out.meta.update(gm.meta)
    return out


def _signature(node: fx.Node) -> tuple:
    return node.name, node.op, str(node.target), str(node.args), str(node.kwargs)


class Engine:
    """Compiles candidates from one captured graph and runs them on batches of the tuning data."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple, name: str, data: TuneData, batch: int,
                 after: str = "attention", seed: int = 0):
        # the prefix as `tpc compile` finds it, before dead code goes: BERT's [CLS] shows in its unused pooler
        self.prefix, _ = prefix_of(gm, analyze(gm, name))
        gm.graph.eliminate_dead_code()  # as every pruned graph is: unused outputs (a pooler) must not shift the node order
        gm.recompile()
        refresh_meta(gm)  # once here, so each candidate's passes find the values before its first pruned layer current

        self.gm, self.example_inputs, self.name = gm, example_inputs, name
        self.data, self.batch, self.after, self.seed = data, batch, after, seed
        self.nodes = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.signatures = [_signature(n) for n in self.nodes]
        self.saved: dict[str, dict[int, torch.Tensor]] = {}  # node name -> batch index -> its unpruned value
        self.prefix_runs = 0

    @property
    def batches(self) -> list[tuple[int, int]]:
        n = len(self.data)
        return [(s, min(n, s + self.batch)) for s in range(0, n, self.batch)]

    def compile(self, steps: list[Step]) -> TpcModule:
        return prune_graph(copy_graph_module(self.gm), self.example_inputs, self.name, steps, prefix=self.prefix,
                           after=self.after, seed=self.seed)

    def cut(self, gm: fx.GraphModule) -> int:
        """Index of the first node of ``gm`` that differs from the unpruned graph."""
        for i, node in enumerate(gm.graph.nodes):
            if i >= len(self.signatures) or _signature(node) != self.signatures[i]:
                return i
        return len(self.signatures)

    @torch.no_grad()
    def _run_prefix(self, stop: int, names: set[str], batch_index: int) -> None:
        """Run the unpruned graph's first ``stop`` nodes on one batch; keep the values of ``names``.

        One batch at a time: a candidate that halving drops after the first round never costs
        the prefix on the batches it would not have reached."""
        self.prefix_runs += 1
        start, end = self.batches[batch_index]
        interp = fx.Interpreter(self.gm)
        interp.env = {}
        interp.args_iter = iter(self.data.batch(start, end))
        for node in self.nodes[:stop]:
            interp.env[node] = interp.run_node(node)
        for name in names:
            self.saved.setdefault(name, {})[batch_index] = interp.env[self.by_name[name]]

    @torch.no_grad()
    def outputs(self, pm: TpcModule, batch_index: int) -> torch.Tensor:
        """The candidate's output on one batch, run from its cut on top of the saved unpruned values."""
        gm = pm.graph_module
        if getattr(pm, "_tune_plan", None) is None:
            cut = self.cut(gm)
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            before = list(gm.graph.nodes)[:cut]
            pm._tune_plan = before, {n.name for n in before if n.op != "get_attr" and any(order[u] >= cut for u in n.users)}
        before, crossing = pm._tune_plan
        cut = len(before)
        missing = {name for name in crossing if batch_index not in self.saved.get(name, {})}
        if missing:
            self._run_prefix(cut, missing, batch_index)
        interp = fx.Interpreter(gm)
        env = {}
        for node in before:
            if node.op == "get_attr":
                env[node] = interp.fetch_attr(node.target)
            elif node.name in crossing:
                env[node] = self.saved[node.name][batch_index]
            else:
                env[node] = None  # not read after the cut
        start, end = self.batches[batch_index]
        return first_tensor(interp.run(*self.data.batch(start, end), initial_env=env))

    @torch.no_grad()
    def reference(self, batch_index: int) -> torch.Tensor:
        start, end = self.batches[batch_index]
        return first_tensor(self.gm(*self.data.batch(start, end)))
