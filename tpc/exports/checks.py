"""Check an artifact against the torch module it came from, decision by decision.

Two backends compute scores with different float rounding, so on near-ties they may keep
different tokens, after which their outputs legitimately differ. The check therefore:

1. runs the artifact and reads its kept indices (every ``select_topk`` result);
2. replays the torch graph with those same decisions forced, recording the decisions torch
   itself would have made and the scores behind them;
3. accepts a differing decision only where the swapped tokens' torch scores lie within float
   noise of the selection boundary, and requires the outputs to agree to ``tol``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree

from tpc.capture import is_token_input
from tpc.errors import REPORT, TpcError, TpcInternalError
from tpc.exports.atomic import atomic_output
from tpc.pt2 import load_program, program_bytes
from tpc.record import unpruned_of

SELECT = torch.ops.tpc.select_topk.default
# Ops whose int64 output is a pruning decision (kept positions), in the order they run.
DECISIONS = (SELECT, torch.ops.tpc.kcenter.default, torch.ops.tpc.divprune.default)
TIE_RTOL = 1e-4
# (output tolerance relative to the output scale, near-tie band) by the outputs' dtype: a
# half-precision model rounds every op to 11 (fp16) or 8 (bf16) significant bits.
TOLERANCES = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def tolerances(outputs: list[torch.Tensor], tol: float | None, tie_rtol: float | None) -> tuple[float, float]:
    """The given tolerances, or those of the least precise floating dtype among ``outputs``."""
    dtypes = {o.dtype for o in outputs}
    default = next((TOLERANCES[d] for d in (torch.bfloat16, torch.float16) if d in dtypes), (1e-4, TIE_RTOL))
    return (default[0] if tol is None else tol), (default[1] if tie_rtol is None else tie_rtol)


class DecisionReplay(fx.Interpreter):
    """Runs a graph, recording each pruning decision and, optionally, forcing them.

    For ``select_topk`` the scores behind the decision are kept too (``None`` otherwise):
    only a top-k over scores can be judged a near-tie.
    """

    def __init__(self, gm: fx.GraphModule, forced: list[torch.Tensor] | None = None):
        super().__init__(gm)
        self.forced = forced
        self.decisions: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target in DECISIONS:
            self.scores.append(args[0] if target is SELECT else None)
            self.decisions.append(out)
            if self.forced is not None and len(self.decisions) <= len(self.forced):
                out = self.forced[len(self.decisions) - 1].to(out.device)
        return out


def flat_outputs(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def run_graph(gm: fx.GraphModule, inputs: tuple, forced=None) -> tuple[list[torch.Tensor], DecisionReplay]:
    replay = DecisionReplay(gm, forced)
    with torch.no_grad():
        out = replay.run(*pytree.tree_leaves(inputs))
    return flat_outputs(out), replay


def near_tie(scores: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor, rtol: float = TIE_RTOL) -> bool:
    """Do two index sets differ only by tokens scored within float noise of the boundary?"""
    for row in range(scores.shape[0]):
        a, b = set(ours[row].tolist()), set(theirs[row].tolist())
        if a == b:
            continue
        if len(a) != len(b):
            return False
        s = scores[row].float()
        finite = s[torch.isfinite(s)]
        tol = rtol * float(finite.abs().max() if finite.numel() else 0.0) + 1e-12
        # every swapped token must lie in one band of width tol around the boundary
        if max(float(s[j]) for j in a - b) - min(float(s[j]) for j in b - a) > tol:
            return False
    return True


@dataclass
class CheckResult:
    max_abs_error: float
    tie_flips: int
    batches: tuple[int, ...]
    lengths: tuple[int | None, ...] = ()  # per check, its token inputs' length (None: no token input)
    unit: str | None = None  # what ``lengths`` count when every check names its own (a decode step's cached positions)

    def where(self) -> str:
        """``at batch 1 and 2``, and a shorter check named as such: ``, and batch 2 at 8 tokens``; with a
        ``unit``, every length named: ``at batch 1 and 2 over 12 cached positions, batch 2 over 21 cached positions``."""
        if self.unit is not None:
            groups: dict = {}
            for b, n in zip(self.batches, self.lengths):
                groups.setdefault(n, []).append(str(b))
            return "at " + ", ".join(f"batch {' and '.join(b)} over {n} {self.unit}" for n, b in groups.items())
        full = max((n for n in self.lengths if n is not None), default=None)
        same = [b for b, n in zip(self.batches, self.lengths or [None] * len(self.batches)) if n == full]
        shorter = [f", and batch {b} at {n} tokens" for b, n in zip(self.batches, self.lengths) if n != full]
        return f"at batch {' and '.join(map(str, same))}{''.join(shorter)}"


def check_artifact(gm: fx.GraphModule, run_artifact: Callable[[tuple], tuple[list, list | None]],
                   inputs_list: list[tuple], what: str, tol: float | None = None,
                   tie_rtol: float | None = None,
                   compared: Callable[[tuple, list[torch.Tensor]], list[torch.Tensor | None]] | None = None,
                   ) -> CheckResult:
    """``run_artifact(inputs) -> (outputs, decisions or None)``; raises TpcError on mismatch.

    ``tol`` (relative to the output scale) and ``tie_rtol`` (the near-tie band relative to the
    largest score) default to the torch module's output dtype: wider for half precision.
    ``compared(inputs, torch_outputs)``: per output, a bool mask of the elements to compare
    (None: all), for outputs the model leaves unspecified at some positions (a decoder's
    left padding: a query row with every key masked, which backends fill differently).
    """
    worst, flips, batches, lengths = 0.0, 0, [], []
    for inputs in inputs_list:
        outs, decisions = run_artifact(inputs)
        outs = [torch.as_tensor(o) for o in outs]
        ref, replay = run_graph(gm, inputs, forced=decisions)
        tol, tie_rtol = tolerances(ref, tol, tie_rtol)
        if decisions is not None:
            if len(decisions) != len(replay.decisions):
                raise TpcError(f"{what}: the artifact makes {len(decisions)} pruning decisions, the module {len(replay.decisions)}")
            for i, (theirs, ours, scores) in enumerate(zip(decisions, replay.decisions, replay.scores)):
                theirs = torch.as_tensor(theirs)
                if torch.equal(theirs.cpu(), ours.cpu()):
                    continue
                if scores is None or not near_tie(scores.cpu(), ours.cpu(), theirs.cpu(), tie_rtol):
                    raise TpcError(f"{what}: pruning step {i} keeps different tokens than the torch module (not a near-tie)")
                flips += 1
        if len(outs) != len(ref):
            raise TpcError(f"{what}: {len(outs)} outputs, the torch module has {len(ref)}")
        masks = compared(inputs, ref) if compared is not None else [None] * len(ref)
        for o, r, m in zip(outs, ref, masks):
            if tuple(o.shape) != tuple(r.shape):
                raise TpcError(f"{what}: output shape {tuple(o.shape)} differs from the torch module's {tuple(r.shape)}")
            if m is not None:
                o, r = o[m.to(o.device)], r[m]
            if o.dtype.is_floating_point:
                o, r = o.float().cpu(), r.float().cpu()
                same_inf = torch.isinf(r) & (o == r)  # an infinity both give (a masked logit) agrees
                if not bool((torch.isfinite(r) | same_inf).all()):
                    raise non_finite(gm, inputs, what)
                o, r = o[~same_inf], r[~same_inf]
                err = float((o - r).abs().max()) if o.numel() else 0.0
                scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
                if not err <= tol * scale:
                    raise TpcError(f"{what}: outputs differ from the torch module by {err:.3g} (allowed {tol * scale:.3g})")
                worst = max(worst, err)
            elif not torch.equal(o.cpu(), r.cpu()):
                raise TpcError(f"{what}: integer outputs differ from the torch module")
        batches.append(int(pytree.tree_leaves(inputs)[0].shape[0]))
        lengths.append(next((int(x.shape[1]) for x in pytree.tree_leaves(inputs) if is_token_input(x)), None))
    return CheckResult(worst, flips, tuple(batches), tuple(lengths))


def non_finite(gm: fx.GraphModule, inputs: tuple, what: str) -> Exception:
    """The error for NaN or inf in the torch module's outputs: tpc's bug when the unpruned model's outputs
    on the same inputs are finite, the weights' or inputs' fault when they are not (or when unknown)."""
    unpruned = unpruned_of(gm)
    if unpruned is not None:
        outs, _ = run_graph(unpruned, inputs)
        if all(bool(torch.isfinite(o).all()) for o in outs if o.dtype.is_floating_point):
            return TpcInternalError(f"internal error: {what}: the pruned model's outputs are NaN or inf on the example "
                                    f"inputs where the unpruned model's are finite, so tpc's pruning made them; {REPORT}")
    even = " even unpruned" if unpruned is not None else ""
    return TpcError(f"{what}: the model's outputs are NaN or inf on the example inputs{even}, so nothing can be "
                    "checked: look for NaN or inf in its weights or example inputs")


def write_checked_program(program: torch.export.ExportedProgram, path, gm: fx.GraphModule,
                          inputs: list[tuple] | None, what: str = "the written program") -> CheckResult | None:
    """``program`` written to ``path`` as a ``.pt2`` (atomically, reproducible bytes); unless ``inputs``
    is None, the file read back and run on each of ``inputs`` against ``gm`` before it is renamed into place."""
    data = program_bytes(program)
    with atomic_output(path, len(data)) as tmp:
        tmp.write_bytes(data)
        if inputs is None:
            return None
        loaded = load_program(tmp, written_by_tpc=True).module()

        def run(batch):
            with torch.no_grad():
                return list(loaded(*batch)), None

        with torch.no_grad():  # tolerance from the outputs' dtype (wider for half precision), as for encoders
            return check_artifact(gm, run, inputs, what)
