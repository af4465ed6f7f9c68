"""``finish()``: the ending every modifying pass shares.

1. dead-code elimination (the custom ``tpc::`` ops are pure, so unused scorers go too; so is an
   attention without dropout: :func:`remove_dead_code`);
2. ``graph.lint()``;
3. ``recompile()``;
4. refresh ``meta["val"]`` of every computed node by fake-tensor propagation, so the next
   pass (and the token counts tpc reports) see the shapes of the rewritten graph. A node whose
   arguments and input values are the ones its value was computed from keeps its value
   (everything upstream of a rewrite), which saves most of the fake propagation when a
   pipeline prunes late layers.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._guards import detect_fake_mode



def refresh_meta(gm: fx.GraphModule, start: fx.Node | None = None) -> None:
    """Recompute ``meta['val']`` of call_function nodes under the graph's fake mode.

    With ``start``, only that node and the nodes after it (the ones a rewrite there can change).
    Autograd stays off, as in the inference graph torch.export captured: with it on, values
    derived from parameters require grad, and some ops then pick another kernel with other
    output strides (CPU SDPA with a bias that requires grad takes the math path), so a
    ``view`` export kept on the old strides would fail (HF Data2VecVision's attention did).
    """
    placeholders = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = detect_fake_mode([v for v in placeholders if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        raise RuntimeError("the graph has no fake input values; capture it with tpc.capture")

    def value(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    with fake_mode, torch.no_grad():
        seen = start is None
        for node in gm.graph.nodes:
            seen = seen or node is start
            if not seen or node.op != "call_function":
                continue
            key = (node.target, str(node.args), str(node.kwargs), *(value(n) for n in node.all_input_nodes))
            old = node.meta.get("tpc_val_key")
            if old is not None and old[0] is node.meta.get("val") and len(old) == len(key) + 1 \
                    and old[1:4] == key[:3] and all(a is b for a, b in zip(old[4:], key[3:])):
                continue  # the value this refresh computed, from the same op on the same inputs: it still holds
            args = fx.node.map_aggregate(node.args, value)
            kwargs = fx.node.map_aggregate(node.kwargs, value)
            node.meta["val"] = node.target(*args, **kwargs)
            node.meta["tpc_val_key"] = (node.meta["val"], *key)


def _impure(node: fx.Node) -> bool:
    """fx's rule, but for SDPA without dropout: fx counts every SDPA impure (its dropout draws random numbers),
    so an attention whose output nothing reads would stay, and with it the layer that feeds it."""
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        return (node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)) != 0
    return node.is_impure()


def remove_dead_code(gm: fx.GraphModule) -> bool:
    """Remove every node no output uses, attention without dropout included. A stock LLaVA reads its vision
    tower's layer -2, so the captured prefill's last vision layer is computed for nothing; this removes it
    (as any layer or head whose result the model drops). Whether anything was removed."""
    changed = gm.graph.eliminate_dead_code(is_impure_node=_impure)
    if changed:
        gm.recompile()
    return changed


def finish(gm: fx.GraphModule, start: fx.Node | None = None) -> None:
    remove_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    refresh_meta(gm, start)
