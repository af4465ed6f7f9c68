from __future__ import annotations

import logging

import pytest
import torch

import tpc
from models import TEST_MODELS
from tpc import TpcError, TpcInternalError
from tpc.cli import main
from tpc.passes import FuseAttentionScores, InsertPrune, Pass, PassManager, PassResult, ProportionalAttention
from tpc.passes.cleanup import finish
from tpc.passes.compaction import Builder, Role


class Noop(Pass):
    name = "noop"

    def call(self, gm):
        return PassResult(gm, False)


class Broken(Pass):
    name = "broken"

    def call(self, gm):
        raise ValueError("boom")


class Refuses(Pass):
    name = "refuses"

    def call(self, gm):
        raise TpcError("cannot do that")


def test_pass_manager_reports_modified_and_names_the_failing_pass(caplog):
    assert PassManager([Noop(), Noop()])(object()).modified is False
    with pytest.raises(TpcError, match=r"^cannot do that \[in pass refuses\]$"):
        PassManager([Refuses(), Noop()])(object())


def test_a_refusal_names_only_the_failing_pass_and_logs_the_passes_before_it(caplog):
    with caplog.at_level(logging.DEBUG, logger="tpc.passes"), pytest.raises(TpcError) as err:
        PassManager([Noop(), Noop(), Refuses()])(object())
    assert "noop" not in str(err.value)
    assert "pass refuses failed after noop, noop" in caplog.text


def test_a_bug_in_a_pass_is_an_internal_error_not_a_refusal():
    with pytest.raises(TpcInternalError, match=r"internal error in pass broken: ValueError: boom; "
                                               r"this is a bug in tpc") as err:
        PassManager([Noop(), Broken()])(object())
    assert not isinstance(err.value, TpcError) and isinstance(err.value.__cause__, ValueError)


def _break_the_linear_rule(monkeypatch):
    """Make the token-axis rule of linear crash as a bug would."""
    from tpc.passes import token_axis_rules

    real = token_axis_rules.rule_for

    def broken(node):
        rule = real(node)
        if "linear" not in str(node.target):
            return rule

        def crash(ctx, n, args):
            raise IndexError("list index out of range")
        return token_axis_rules.Rule(crash)

    monkeypatch.setattr("tpc.passes.propagate_token_axis.rule_for", broken)


def test_a_broken_rule_is_reported_with_its_pass_and_node(monkeypatch):
    _break_the_linear_rule(monkeypatch)
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    with pytest.raises(TpcInternalError, match=r"internal error in pass insert_prune\(layer 1\) "
                                               r"at node 'linear_\d+' \(aten\.linear\) in blocks\.1\.mlp\.fc1: IndexError"):
        tpc.compile(factory(), inputs(2), method="random", layers=[1], keep=8)


@pytest.mark.slow
def test_the_cli_says_internal_error_and_exits_3(monkeypatch, capsys, tmp_path):
    _break_the_linear_rule(monkeypatch)
    code = main(["compile", "models:cli_tiny_vit", "--layers", "1", "--keep", "8", "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 3 and err.startswith("tpc: internal error in pass insert_prune(layer 1)"), err
    assert "bug in tpc" in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


def _break_the_onnx_translations(monkeypatch):
    """Make a helper every tpc:: ONNX translation uses fail as a bug would (a KeyError inside tpc)."""
    import functools

    monkeypatch.setattr("tpc.exports.onnx_ops._ints", functools.partial(dict.__getitem__, {}))


@pytest.mark.slow
def test_a_bug_in_tpcs_onnx_translation_is_an_internal_error_not_the_models_fault(monkeypatch, capsys, tmp_path):
    _break_the_onnx_translations(monkeypatch)
    code = main(["compile", "models:cli_tiny_vit", "--layers", "1", "--keep", "8", "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 3 and err.startswith("tpc: internal error: ONNX export failed"), err
    assert "KeyError" in err and "bug in tpc" in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_refusal_inside_tpcs_onnx_translation_stays_a_refusal(monkeypatch, capsys, tmp_path):
    """torch.onnx wraps what a translation raises in its own error: a TpcError in there is still tpc's
    deliberate refusal (exit 1, its own words), not reported as a bug in tpc."""
    def refuse(*args):
        raise TpcError("this pruning op has no ONNX form here: export .pt2 instead")

    monkeypatch.setattr("tpc.exports.onnx_ops._ints", refuse)
    code = main(["compile", "models:cli_tiny_vit", "--layers", "1", "--keep", "8", "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err == "tpc: error: this pruning op has no ONNX form here: export .pt2 instead\n", err
    assert not list(tmp_path.iterdir())


def test_a_model_that_torch_export_cannot_capture_is_still_refused_as_the_models():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # branches on a value: torch.export refuses

    with pytest.raises(TpcError, match="torch.export could not capture DataDependent") as err:
        tpc.compile(DataDependent(), (torch.randn(2, 4, 8),), method="random", layers=[0], keep=2)
    assert not isinstance(err.value, TpcInternalError)


@pytest.mark.slow
def test_a_program_tpc_cannot_read_back_is_its_own_bug(monkeypatch, tmp_path):
    """The .pt2 check loads the file tpc just wrote: failing to is not the user's model's fault."""
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), method="random", layers=[1], keep=8)
    monkeypatch.setattr("tpc.pt2._refusal", lambda names, read: "it holds something unexpected")
    with pytest.raises(TpcInternalError, match="tpc cannot load the program it wrote"):
        tpc.export(pm, tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_a_graph_tpc_rewrote_that_will_not_re_export_is_its_own_bug(monkeypatch, tmp_path, suffix):
    """torch.export captured the model once; failing on tpc's rewrite of it is tpc's bug, whoever's
    frame raised it (here a stand-in outside tpc, as torch's would be)."""
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    pm = tpc.compile(factory(), inputs(2), method="random", layers=[1], keep=8)

    def refuses(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.export, "export", refuses)
    with pytest.raises(TpcInternalError, match="torch.export could not re-export tpc's rewritten graph: RuntimeError"):
        tpc.export(pm, tmp_path / f"m{suffix}")
    assert not list(tmp_path.iterdir())


def _chain(*packages: str):
    """A function that calls through one frame per package (outermost first); the last one raises."""
    call = None
    for package in reversed(packages):
        scope = {"__name__": f"{package}.module", "inner": call}
        exec("def f():\n    if inner is None:\n        raise ValueError('raised')\n    return inner()", scope)
        call = scope["f"]
    return call


def _raised(*packages: str) -> Exception:
    try:
        _chain(*packages)()
    except ValueError as err:
        return err


@pytest.mark.parametrize("packages, bug", [
    (("torch", "tpc"), True),  # tpc's own code raised (a fake impl, an ONNX translation)
    (("torch", "tpc", "torch"), True),  # torch refused what tpc's code handed it
    (("tpc", "transformers", "torch"), False),  # the model's code (called from tpc's VLM wrapper) failed in torch
    (("torch", "mymodel"), False),  # the user's own model file
    (("torch", "onnxscript", "onnx"), False),  # the tooling alone
    (("tpc", "triton", "torch"), True),  # tpc's kernel handed Triton something it refused
    (("tpc", "safetensors"), True),  # tpc's code loading weights
    (("tpc", "transformers", "optree"), False),  # the model's code, in a library torch calls
    (("torch", "mymodel", "torch"), False),  # torch refused what the model handed it
])
def test_who_raised_it(packages, bug):
    from tpc.errors import raised_in_tpc, refusal_or_bug

    err = _raised(*packages)
    assert (raised_in_tpc(err) is err) is bug
    assert isinstance(refusal_or_bug(err, "capture failed: raised"), TpcInternalError if bug else TpcError)


def test_a_bug_while_handling_a_refusal_is_still_a_bug():
    from tpc.errors import refusal_or_bug

    try:
        try:
            raise TpcError("a refusal tpc handles itself")
        except TpcError:
            _chain("torch", "tpc")()
    except ValueError as err:
        assert isinstance(refusal_or_bug(err, "export failed: raised"), TpcInternalError)


def _tiny_graph():
    """A captured graph with fake values (two linears and a relu)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    return torch.export.export(model, (torch.randn(2, 4),)).module()


def _first(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


class InsertsWithoutRole(Pass):
    name = "inserts_without_role"

    def call(self, gm):
        relu = _first(gm, torch.ops.aten.relu.default)
        with gm.graph.inserting_after(relu):
            neg = gm.graph.call_function(torch.ops.aten.neg.default, (relu,))
        relu.replace_all_uses_with(neg, delete_user_cb=lambda u: u is not neg)
        finish(gm)
        return PassResult(gm, True)


class SaysNoChange(Pass):
    name = "says_no_change"

    def call(self, gm):
        relu = _first(gm, torch.ops.aten.relu.default)
        relu.target = torch.ops.aten.sigmoid.default
        gm.recompile()
        return PassResult(gm, False)


class LeavesStaleValues(Pass):
    name = "leaves_stale_values"

    def call(self, gm):
        relu = _first(gm, torch.ops.aten.relu.default)
        linear = next(iter(relu.users))
        linear.replace_input_with(relu, relu.args[0])  # no finish(): its fake value was computed from the relu
        gm.recompile()
        return PassResult(gm, True)


@pytest.mark.parametrize("bad,message", [(InsertsWithoutRole, r"node 'neg_default' \(aten.neg\) in the top-level module was inserted without a role"),
                                         (SaysNoChange, "it reported no change but changed gm.code"),
                                         (LeavesStaleValues, r"the fake value of node 'linear_1' \(aten.linear\) .* is stale")])
def test_the_manager_enforces_the_pass_rules_when_checking(bad, message):
    with pytest.raises(TpcInternalError, match=f"pass {bad.name} broke the pass rules: {message}"):
        PassManager([bad()], check=True)(_tiny_graph())
    PassManager([bad()], check=False)(_tiny_graph())  # unchecked, the same pass goes through


def test_the_test_suite_checks_every_pass():
    assert PassManager([]).check  # conftest.py sets TPC_CHECK_PASSES=1


def test_declared_pass_order_is_enforced_before_anything_runs():
    with pytest.raises(TpcInternalError, match="pass fuse_attention_scores must run after every InsertPrune, but "
                                               r"insert_prune\(layer 0\) comes later"):
        PassManager([FuseAttentionScores(), InsertPrune("random", 0, 0.5, 1)])
    PassManager([InsertPrune("random", 0, 0.5, 1), ProportionalAttention(), FuseAttentionScores()])


def test_a_tpc_op_without_a_token_axis_rule_is_tpcs_bug_not_a_refusal():
    """Compactions inserted out of layer order make the earlier one meet the later one's tpc:: ops;
    that is a bug in the pass list, never a refusal of the user's model."""
    factory, inputs, _, _ = TEST_MODELS["timm_vit"]
    gm = tpc.capture.capture(factory(), inputs(2))
    with pytest.raises(TpcInternalError, match=r"pass insert_prune\(layer 1\) at node .*: RuntimeError: tpc's own "
                                               r"op tpc\.\w+\.default reads the tokens of the compaction at layer 1"):
        PassManager([InsertPrune("random", 2, 0.5, 1), InsertPrune("random", 1, 0.5, 1)])(gm)

