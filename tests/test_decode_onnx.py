"""The rewritten decode step (tidal, quest) as ONNX, run in ONNX Runtime: each decode op's
translation against the torch op (ties, a left-padded mask, bool and float masks, a budget
computed from the symbolic cache length), the exported step's logits and new keys and values
against the torch step at batch 1 and 3 and two cache lengths from one export, what reads a
sparse layer's cache in the ONNX graph, and the CLI (a checked .onnx; refusals leave no file)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.export import Dim

from decode_reference import tidal_step
from test_decode import _random_step, tiny
from tpc.decode import compile_decoder
from tpc.decode.onnx_ops import ALL_TRANSLATIONS
from tpc.decode.pages import bounds_for
from tpc.errors import TpcError
from tpc.exports.onnx import program_to_onnx

transformers = pytest.importorskip("transformers")
GOLDEN = Path(__file__).parent / "golden"
ops = torch.ops.tpc
LOWEST = torch.finfo(torch.float32).min


def _float(mask):
    """A bool SDPA mask as the additive float mask (0 or the dtype's minimum) a model may give instead."""
    return torch.zeros(mask.shape).masked_fill(~mask, LOWEST)


class TidalOps(nn.Module):
    """tidal's ops chained as SparseDecode chains them, with a bool and a float mask; top_positions also on
    tied scores, at a budget over the cache, and at a ratio computed from the symbolic cache length."""

    def forward(self, q, keys, mask, fmask, tied, cache):
        index = ops.top_positions(ops.group_attention(q, keys, mask, 0.5), 3)
        ratio = (cache.shape[2] + 2) // 3  # ceil(L / 3), as rewrite.budget builds it
        return (ops.group_attention(q, keys, mask, 0.5), ops.group_attention(q, keys, fmask, 0.5), index,
                ops.top_positions(tied, 4), ops.top_positions(tied, 1), ops.top_positions(tied, 99),
                ops.top_positions(tied, ratio), ops.gather_positions(cache, index),
                ops.gather_positions(mask.transpose(2, 3), index), ops.gather_positions(fmask.transpose(2, 3), index))


class QuestOps(nn.Module):
    """quest's ops chained as QuestDecode chains them (pages of 3, so the last page is partial at most
    lengths and left padding shifts each example's pages), with a bool and a float mask."""

    def forward(self, q, bounds, mask, fmask, tied):
        outs = []
        for m in (mask, fmask):
            scores = ops.page_scores(q, bounds, m, 3)
            pages = ops.top_pages(scores, 2)
            outs += [scores, pages, ops.page_positions(pages, m, 3), ops.page_mask(m, pages, 3)]
        ratio = (tied.shape[2] + 1) // 2
        return (*outs, ops.top_pages(tied, 3), ops.top_pages(tied, 1), ops.top_pages(tied, 50),
                ops.top_pages(tied, ratio))


def _mask(batch, length, gen):
    """[B, 1, 1, L + 1] bool: example b left-padded by a random count below L (the first by none)."""
    valid = torch.ones(batch, length + 1, dtype=torch.bool)
    for b in range(1, batch):
        valid[b, :int(torch.randint(1, length, (1,), generator=gen))] = False
    return valid[:, None, None]


def _tied(shape, gen):
    """Scores of a few values only (many ties), some -inf."""
    scores = torch.randint(0, 3, shape, generator=gen).float()
    return scores.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))


def _tie_at_the_boundary(scores, count) -> bool:
    """Whether some row's ``count``-th best score equals the next one (so which one is kept is a tie-break)."""
    ordered = scores.flatten(0, -2).sort(-1, descending=True).values
    return bool((ordered[:, count - 1] == ordered[:, count]).any())


def _tidal_inputs(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = _mask(batch, length, gen)
    return (torch.randn(batch, 4, 1, 8, generator=gen), torch.randn(batch, 2, length + 1, 8, generator=gen), mask,
            _float(mask), _tied((batch, 2, length + 1), gen), torch.randn(batch, 2, length, 8, generator=gen))


def _quest_inputs(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = _mask(batch, length, gen)
    keys = torch.randn(batch, 2, length, 8, generator=gen)
    pages = -(-length // 3)
    return (torch.randn(batch, 4, 1, 8, generator=gen), ops.page_bounds(keys, mask, 3), mask, _float(mask),
            _tied((batch, 2, pages), gen))


def _session(module, example, dynamic):
    program = torch.export.export(module, example, dynamic_shapes=dynamic)
    model = program_to_onnx(program, example, ALL_TRANSLATIONS)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.from_numpy(g)
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape, g.dtype, w.dtype)
        if w.dtype.is_floating_point:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(g, w), (i, g, w)


def _run(session, xs):
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)})


def test_tidal_translations_match_the_ops():
    """group_attention, top_positions (ties to the lower position, a budget over the cache, a ratio),
    gather_positions (a cache, a one-head mask) in ONNX Runtime at other batches and cache lengths."""
    b, cache = Dim("batch", min=1, max=64), Dim("cache", min=2, max=1024)
    dynamic = ({0: b}, {0: b, 2: cache + 1}, {0: b, 3: cache + 1}, {0: b, 3: cache + 1}, {0: b, 2: cache + 1},
               {0: b, 2: cache})
    session = _session(TidalOps(), _tidal_inputs(2, 10, 0), dynamic)
    for batch, length, seed in ((1, 9, 1), (3, 14, 2), (4, 5, 3)):
        xs = _tidal_inputs(batch, length, seed)
        want = TidalOps()(*xs)
        assert want[3].shape[-1] == 4 and want[5].shape[-1] == length  # the budget over the cache is clamped
        assert _tie_at_the_boundary(xs[4][..., :-1], 4)
        _assert_same(_run(session, xs), want)


def test_quest_translations_match_the_ops():
    """page_scores (padding-only pages -inf), top_pages (ties to the lower page, budgets over the pages, a
    ratio), page_positions and page_mask (partial pages, left padding) in ONNX Runtime."""
    b, cache, pages = Dim("batch", min=1, max=64), Dim("cache", min=2, max=1024), Dim("pages", min=1, max=1024)
    dynamic = ({0: b}, {0: b, 3: pages}, {0: b, 3: cache + 1}, {0: b, 3: cache + 1}, {0: b, 2: pages})
    session = _session(QuestOps(), _quest_inputs(2, 10, 0), dynamic)
    for batch, length, seed in ((1, 9, 1), (3, 14, 2), (4, 5, 3), (2, 20, 4)):
        xs = _quest_inputs(batch, length, seed)
        want = QuestOps()(*xs)
        assert bool(torch.isinf(want[0]).any()) or batch == 1 or length < 6  # padding-only pages are scored -inf
        assert xs[4].shape[-1] <= 3 or _tie_at_the_boundary(xs[4], 3)
        _assert_same(_run(session, xs), want)


def _step_inputs(model, sparse, batch, length, seed):
    """One step's inputs at ``batch`` × ``length`` (random cache), the second example left-padded."""
    gen = torch.Generator().manual_seed(seed)
    layers, width = model.config.num_hidden_layers, model.config.hidden_size // model.config.num_attention_heads
    past = [torch.randn(batch, 2, length, width, generator=gen) for _ in range(2 * layers)]
    mask = torch.ones(batch, length + 1, dtype=torch.long)
    mask[1:, :length // 3] = 0
    inputs = (torch.randint(3, 96, (batch, 1), generator=gen), mask.sum(1, keepdim=True) - 1, mask, past)
    return (*inputs, bounds_for(sparse.plan, past, mask)) if sparse.takes_bounds else inputs


@pytest.fixture(scope="module")
def written(decode_capture, tmp_path_factory):
    """written(family, method) -> (model, the DecodeModule, its .onnx as a session, the ONNX model), one export
    each ("dense": the captured step, every layer dense, as ``unpruned()`` gives it)."""
    made = {}
    settings = {"tidal": {"layers": [1], "keep": 3}, "quest": {"keep": 0.3, "options": {"page": 4}}}

    def get(family, method):
        if (family, method) not in made:
            model, program = decode_capture(family)
            sparse = compile_decoder(model, method=method if method != "dense" else "tidal", program=program,
                                     **settings.get(method, settings["tidal"]))
            sparse = sparse.unpruned() if method == "dense" else sparse
            path = tmp_path_factory.mktemp("decode_onnx") / f"{family}_{method}.onnx"
            result = sparse.save(path)
            assert result.batches == (1, 2, 1, 2) and len(set(result.lengths)) == 2 and result.max_abs_error < 1e-4
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            made[family, method] = model, sparse, session, onnx.load(path)
        return made[family, method]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family, method", [("llama", "tidal"), ("llama", "quest"), ("qwen2", "dense")])
def test_the_onnx_step_gives_the_torch_step_s_logits_and_cache(written, family, method, update_golden):
    """Logits and every layer's new keys and values from ONNX Runtime equal the torch step's at batch 1
    and 3 and cache lengths 7 and 30 (left-padded), from one export; the sparse layers read fewer
    positions than the dense step (their logits differ); only GatherElements (and Shape) read a sparse
    layer's cache; the op types are golden. The dense step (no method) is written and checked as well, on
    Qwen2 (biased q, k, v projections)."""
    model, sparse, session, proto = written(family, method)
    dense = sparse.unpruned()
    names = [i.name for i in session.get_inputs()]
    for batch, length in ((1, 7), (3, 30), (3, 7), (1, 30)):
        xs = _step_inputs(model, sparse, batch, length, batch * length)
        flat = [x for x in torch.utils._pytree.tree_leaves(xs)]
        got = session.run(None, {n: x.numpy() for n, x in zip(names, flat)})
        want = sparse.step(*xs)
        assert len(got) == len(want) == 1 + 2 * model.config.num_hidden_layers
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-5, rtol=1e-5)
        if length == 30 and method != "dense":
            assert not torch.allclose(want[0], dense.step(*xs[:4])[0], atol=1e-3)
    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    for layer in sparse.plan.sparse if sparse.plan else []:
        for name in (f"past_{2 * layer}", f"past_{2 * layer + 1}"):
            assert readers[name] <= {"GatherElements", "Shape"}, (name, readers[name])
    text = "".join(f"{op} {n}\n" for op, n in sorted(Counter(n.op_type for n in proto.graph.node).items()))
    path = GOLDEN / f"decode_onnx_{method}_{family}.txt"
    if update_golden:
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed: review, then run pytest --update-golden"


@pytest.mark.slow
def test_cli_writes_a_checked_onnx_decode_step(tmp_path, capsys):
    """`tpc compile DIR --pass tidal -o dec.onnx`: checked in ONNX Runtime at two batches and two cache
    lengths, then its logits in ONNX Runtime equal the slow reference's (tests/decode_reference.py)."""
    from tpc.cli import main

    directory, out = tmp_path / "llama", tmp_path / "dec.onnx"
    model = tiny("llama")
    model.save_pretrained(directory)
    capsys.readouterr()
    assert main(["compile", str(directory), "--pass", "tidal", "--layers", "1", "--keep", "3", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ONNX opset 18, standard ops, the decode step, dynamic batch and cache length" in text
    assert "checked against the torch module at batch 1 and 2 over 12 cached positions, batch 1 and 2 over 21" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec.onnx", "llama"]
    token, position, valid, past = _random_step(model)
    flat = [token, position, valid.long(), *(t for kv in past for t in kv)]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), flat)})[0]
    with torch.no_grad():
        expected, _ = tidal_step(model, token, position, valid, past, selection=[1], keep=3)
    torch.testing.assert_close(torch.from_numpy(logits), expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, words", [
    (["--keep", "0"], "give a budget of 1 or more"),
    (["--layers", "9"], "selection layer 9 is out of range"),
    (["--r", "4"], "takes method, layers, keep and options only"),
])
def test_cli_bad_flags_give_one_line_and_no_onnx_file(tmp_path, capsys, args, words):
    from tpc.cli import main

    directory, out = tmp_path / "llama", tmp_path / "dec.onnx"
    tiny("llama").save_pretrained(directory)
    capsys.readouterr()
    assert main(["compile", str(directory), "--pass", "tidal", *args, "-o", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and words in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


@pytest.mark.slow
def test_an_onnx_step_that_fails_its_check_leaves_no_file(decode_capture, tmp_path, monkeypatch):
    """A translation that selects other positions than the op (the lowest scores): ONNX Runtime's outputs
    differ from the torch step's, the check refuses in one line, and nothing is written."""
    from tpc.decode import onnx_ops
    from onnxscript import opset18 as op

    def lowest(scores, count):
        past = op.Slice(scores, onnx_ops._ints(0), onnx_ops._ints(-1), onnx_ops._ints(2))
        return onnx_ops._top_ascending(op.Neg(past), count)

    model, program = decode_capture("llama")
    sparse = compile_decoder(model, layers=[1], keep=3, program=program)
    monkeypatch.setitem(onnx_ops.ALL_TRANSLATIONS, torch.ops.tpc.top_positions.default, lowest)
    with pytest.raises(TpcError, match="ONNX file dec.onnx: outputs differ from the torch module"):
        sparse.save(tmp_path / "dec.onnx")
    assert not list(tmp_path.iterdir())


def test_a_dhsa_step_is_refused_as_onnx_in_one_line(cli, decode_capture, tmp_path):
    """dhsa's chunk ops have no ONNX translation: `-o dec.onnx` is refused before the model loads, and
    ``save("….onnx")`` before anything is exported; no file either way."""
    result = cli("compile", tmp_path / "no-such-model", "--pass", "dhsa", "-o", tmp_path / "dec.onnx")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "the dhsa decode step is written as .pt2 only: its ops have no ONNX translation yet" in result.stderr
    model, program = decode_capture("llama")
    sparse = compile_decoder(model, method="dhsa", keep=4, program=program)
    with pytest.raises(TpcError, match="the dhsa decode step is written as .pt2 only"):
        sparse.save(tmp_path / "dec.onnx")
    assert not list(tmp_path.iterdir())
