"""Quest (query-aware page selection) on stock Llama and Qwen2 decode steps: the positions each
quest layer reads and the step logits against a slow reference written from the paper, what
the sparse layers' attention reads, keep-everything identity through generate(), batches
against single examples, the page ops against loops and their fakes, golden text, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx

from decode_reference import quest_step
from test_decode import _random_step, _readers, prompts, tiny
from tpc.decode import compile_decoder
from tpc.decode.graph import step_symbols
from tpc.decode.pages import bounds_for
from tpc.errors import TpcError
from tpc.graph.printing import format_rewrites

transformers = pytest.importorskip("transformers")
GOLDEN = Path(__file__).parent / "golden"
tpc = torch.ops.tpc


@pytest.fixture
def captured(decode_capture):
    """One capture per family and worker, shared with test_decode (conftest's ``decode_capture``)."""
    return decode_capture


def quest(captured, family="llama", **settings):
    model, program = captured(family)
    settings = {"keep": 3, "options": {"page": 2}, **settings}
    return model, compile_decoder(model, method="quest", program=program, **settings)


class _Reads(fx.Interpreter):
    """Runs the graph; per quest layer, the cached positions its attention may read (gathered and not
    masked), and per attention the number of key positions it is given."""

    def __init__(self, gm):
        super().__init__(gm)
        self.positions, self.keys_read = [], []
        self._index = None

    def run_node(self, node):
        out = super().run_node(node)
        if node.target is tpc.page_positions.default:
            self._index = out
        if node.target is tpc.page_mask.default:
            allowed = out[:, :, 0, :-1]
            self.positions.append([[sorted({int(j) for j, ok in zip(self._index[b, h], allowed[b, h]) if ok})
                                    for h in range(out.shape[1])] for b in range(out.shape[0])])
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            self.keys_read.append(self.env[node.args[1]].shape[2])
        return out


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_read_positions_and_step_logits_match_the_paper(captured, family):
    """Default quest layers (2 and 3 of 4), 3 positions' budget = 2 pages of 2; 9 cached positions
    (5 pages, the last partial); the second example's first 3 positions are padding."""
    model, sparse = quest(captured, family)
    assert sparse.plan.sparse == [2, 3]
    token, position, valid, past = _random_step(model)
    flat = [t for kv in past for t in kv]
    reads = _Reads(sparse.gm)
    with torch.no_grad():
        logits = reads.run(token, position, valid.long(), flat, bounds_for(sparse.plan, flat, valid.long()))[0]
        expected, chosen = quest_step(model, token, position, valid, past, layers=[2, 3], keep=3, page=2)
    assert reads.positions == [chosen[2], chosen[3]]
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
    assert reads.keys_read == [10, 10, 5, 5]  # layers 2 and 3: 2 pages of 2 positions + the new token


def test_a_ratio_reads_the_pages_of_its_share_of_each_cache_length(captured):
    """keep=0.3, pages of 2: ceil(ceil(0.3 × L) / 2) pages, at 9 cached positions 2 pages (3 positions
    rounded up), at 20 3 pages (6 positions); positions and logits those of the reference with that budget."""
    model, sparse = quest(captured, keep=0.3)
    for length, k in ((9, 3), (20, 6)):
        token, position, valid, past = _random_step(model, length)
        flat = [t for kv in past for t in kv]
        reads = _Reads(sparse.gm)
        with torch.no_grad():
            logits = reads.run(token, position, valid.long(), flat, bounds_for(sparse.plan, flat, valid.long()))[0]
            expected, chosen = quest_step(model, token, position, valid, past, layers=[2, 3], keep=k, page=2)
        assert reads.positions == [chosen[2], chosen[3]]
        torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
        pages = -(-k // 2)
        assert reads.keys_read == [length + 1, length + 1, 2 * pages + 1, 2 * pages + 1]
        assert sparse.report.positions_read(2, length) == 2 * pages + 1


def test_only_gathers_read_the_quest_layers_cache(captured):
    """A quest layer's cached keys and values are read by the gathers alone (its pages are scored from
    the bounds, a step input kept beside the cache), never by a full-cache attention."""
    _, sparse = quest(captured)
    placeholders = [n for n in sparse.gm.graph.nodes if n.op == "placeholder"][3:]
    past, bounds = placeholders[:8], placeholders[8:]
    for layer in sparse.plan.sparse:
        for cache in past[2 * layer:2 * layer + 2]:
            assert _readers(cache) == [tpc.gather_positions.default]
    assert [_readers(b) for b in bounds] == [[tpc.page_scores.default]] * 2
    assert _readers(past[0]) == [torch.ops.aten.cat.default]  # layer 0 is dense


def test_the_bounds_kept_beside_the_cache_are_those_of_its_keys():
    """PageBounds after the prompt and after each of 7 new tokens (pages of 3; the second example has
    4 positions of left padding) equals tpc::page_bounds of the whole cache, which the loops check."""
    from tpc.decode.pages import PageBounds
    from tpc.decode.plan import Plan

    plan = Plan("quest", 2, (1,), 3, page=3)
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 2, 12, 4, generator=gen)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    past = [torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 4), keys[:, :, :5], torch.zeros(2, 2, 5, 4)]
    kept = PageBounds(plan, past, mask[:, :6], capacity=12)
    for length in range(5, 12):
        expected = tpc.page_bounds(keys[:, :, :length], mask[:, None, None, :length + 1].bool(), 3)
        assert torch.equal(kept.views()[0], expected), length
        kept.append((None, None, keys[:, :, length:length + 1], None))


def test_generate_hands_every_step_the_bounds_of_its_cache(captured):
    """generate()'s PageBounds, kept beside the KV buffer, equal tpc::page_bounds of the cache each step
    is given: a left-padded batch whose cache (10 positions, pages of 3) grows across page boundaries
    for 7 steps, then a second generate() on the same module (bounds start afresh)."""
    _, sparse = quest(captured, keep=3, options={"page": 3}, layers=[1, 2, 3])
    ids, mask = prompts()
    run, checked = sparse.step, []

    def step(input_ids, position_ids, attention_mask, past, bounds=None):
        expected = bounds_for(sparse.plan, past, attention_mask)
        checked.append(all(torch.equal(b, e) for b, e in zip(bounds, expected, strict=True)))
        return run(input_ids, position_ids, attention_mask, past, bounds)

    sparse.step = step  # an instance attribute: generate() calls it, then the module's own step
    sparse.generate(ids, mask, max_new_tokens=8, eos_token_id=None)
    sparse.generate(ids[1:, 4:], mask[1:, 4:], max_new_tokens=5, eos_token_id=None)
    assert checked == [True] * (7 + 4)


@pytest.mark.parametrize("page", [3, pytest.param(16, marks=pytest.mark.slow)])
def test_a_budget_over_the_cache_generates_the_dense_tokens(captured, page):
    model, sparse = quest(captured, keep=64, options={"page": page})
    ids, mask = prompts()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(sparse.generate(ids, mask, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.slow
def test_a_budget_over_the_cache_samples_the_dense_tokens(captured):
    model, sparse = quest(captured, keep=64, options={"page": 3}, layers=[0, 1, 2, 3])
    ids, mask = prompts()
    torch.manual_seed(5)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20,
                                  temperature=0.8)
    torch.manual_seed(5)
    assert torch.equal(sparse.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8),
                       expected)


def test_a_batch_generates_what_each_example_generates_alone(captured):
    """The second example has 4 positions of left padding, pages of 3: its pages are aligned at its
    first token, so it reads the same positions in the batch as alone."""
    _, sparse = quest(captured, keep=3, options={"page": 3}, layers=[1, 2, 3])
    ids, mask = prompts()
    together, logits = sparse.generate(ids, mask, max_new_tokens=6), _first_step_logits(sparse, ids, mask)
    for b in range(2):
        real = ids[b:b + 1, mask[b].bool()]
        alone = sparse.generate(real, torch.ones_like(real), max_new_tokens=6)
        assert torch.equal(together[b, -6:], alone[0, -6:])
        torch.testing.assert_close(logits[b:b + 1], _first_step_logits(sparse, real, torch.ones_like(real)),
                                   atol=1e-5, rtol=1e-5)


def _first_step_logits(sparse, ids, mask):
    """Logits of the decode step after the prompt (its greedy token fed back)."""
    logits, cache, positions = sparse.prefill(ids, mask)
    past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    full = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return sparse.step(logits.argmax(-1, keepdim=True), positions[:, -1:] + 1, full, past)[0]


def test_a_quest_step_is_not_inspected_as_a_prompt_model(captured):
    """The refusal names the decode-time methods, quest among them (it named tidal alone)."""
    import tpc as tpc_api

    model, sparse = quest(captured)
    token, position, valid, past = _random_step(model)
    flat = [t for kv in past for t in kv]
    inputs = (token, position, valid.long(), flat, bounds_for(sparse.plan, flat, valid.long()))
    with pytest.raises(TpcError, match=r"is a decode step tpc wrote .*\(with --pass tidal or quest or dhsa --layers"):
        tpc_api.inspect(sparse.gm, inputs)


def test_golden_decode_step(captured, update_golden):
    _, sparse = quest(captured, layers=[3])
    text = format_rewrites(sparse.gm, step_symbols(sparse.gm))
    path = GOLDEN / "decode_quest_llama.txt"
    if update_golden:
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed: review, then run pytest --update-golden"


def test_the_page_ops_match_loops_and_their_fakes():
    """Pages of 3 over 8 cached positions (3 pages, the last partial); the second example's first 4
    positions are padding, so its pages start at position 1 (4 mod 3) and its first page is padding."""
    gen = torch.Generator().manual_seed(1)
    keys, q = torch.randn(2, 2, 8, 4, generator=gen), torch.randn(2, 4, 1, 4, generator=gen)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False
    starts = [0, 1]
    bounds = tpc.page_bounds(keys, mask, 3)
    scores = tpc.page_scores(q, bounds, mask, 3)
    assert bounds.shape == (2, 2, 2, 3, 4) and scores.shape == (2, 2, 3)
    for b, h, n in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(3)).tolist():
        members = [j for j in range(starts[b] + 3 * n, min(starts[b] + 3 * n + 3, 8)) if mask[b, 0, 0, j]]
        if not members:
            assert scores[b, h, n] == float("-inf")
            continue
        low = [min(float(keys[b, h, j, d]) for j in members) for d in range(4)]
        high = [max(float(keys[b, h, j, d]) for j in members) for d in range(4)]
        assert bounds[b, h, 0, n].tolist() == pytest.approx(low) and bounds[b, h, 1, n].tolist() == pytest.approx(high)
        bound = sum(max(float(q[b, g, 0, d]) * low[d], float(q[b, g, 0, d]) * high[d])
                    for g in (2 * h, 2 * h + 1) for d in range(4))
        assert float(scores[b, h, n]) == pytest.approx(bound, rel=1e-5)
    pages = tpc.top_pages(scores, 2)
    for b, h in torch.cartesian_prod(torch.arange(2), torch.arange(2)).tolist():
        order = sorted(range(3), key=lambda n: (-float(scores[b, h, n]), n))
        assert pages[b, h].tolist() == sorted(order[:2])
    assert tpc.top_pages(scores, 9).shape == (2, 2, 3)  # the budget is clamped to the pages
    index, allowed = tpc.page_positions(pages, mask, 3), tpc.page_mask(mask, pages, 3)
    for b, h in torch.cartesian_prod(torch.arange(2), torch.arange(2)).tolist():
        slots = [starts[b] + 3 * int(n) + t for n in pages[b, h] for t in range(3)]
        assert index[b, h].tolist() == [min(s, 7) for s in slots]
        assert allowed[b, h, 0].tolist() == [s < 8 and bool(mask[b, 0, 0, s]) for s in slots] + [True]
    for op, args in [(tpc.page_bounds.default, (keys, mask, 3)), (tpc.page_scores.default, (q, bounds, mask, 3)),
                     (tpc.top_pages.default, (scores, 2)), (tpc.page_positions.default, (pages, mask, 3)),
                     (tpc.page_mask.default, (mask, pages, 3)), (tpc.page_mask.default, (mask.float(), pages, 3))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("settings, message", [
    ({"options": {"page": 0}}, "option page is a number of positions \\(1 or more\\), not 0"),
    ({"options": {"page": 2.5}}, "option page is a number of positions \\(1 or more\\), not 2.5"),
    ({"options": {"page": "x"}}, "option page is a number of positions"),
    ({"options": {"page": 10**9}}, "option page 1000000000 is more than the 1048576 cached positions"),
    ({"options": {"pages": 4}}, "quest has no option 'pages'; its options: page \\(default 16\\)"),
    ({"keep": 0}, "give a budget of 1 or more"),
    ({"keep": 1.5}, "keep ratio 1.5 is outside"),
    ({"layers": [1, 4]}, "sparse layer 4 is out of range: the model has 4 decoder layers"),
])
def test_bad_settings_are_refused_before_capture(settings, message):
    with pytest.raises(TpcError, match=message):
        compile_decoder(tiny("llama"), method="quest", **settings)


def test_tidal_takes_only_its_correction_option():
    with pytest.raises(TpcError, match="tidal has no option 'page'; its options: correct \\(default 0\\)"):
        compile_decoder(tiny("llama"), method="tidal", options={"page": 4})


@pytest.mark.parametrize("args, words", [
    (["--option", "page=0"], "option page is a number of positions (1 or more), not 0"),
    (["--option", "page=x"], "option page is a number of positions (1 or more), not 'x'"),
    (["--keep", "0"], "give a budget of 1 or more"),
    (["--option", "page=1048577"], "option page 1048577 is more than the 1048576 cached positions"),
])
def test_cli_bad_settings_give_one_line_and_no_file(tmp_path, capsys, args, words):
    from tpc.cli import main

    out = tmp_path / "dec.pt2"
    assert main(["compile", str(tmp_path / "never-loaded"), "--pass", "quest", *args, "-o", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_inspect_and_passes_say_which_layers_read_pages(tmp_path, capsys):
    import tpc as tpc_api
    from tpc.cli import main

    directory = tmp_path / "llama"
    tiny("llama").save_pretrained(directory)
    capsys.readouterr()
    assert main(["inspect", str(directory), "--pass", "quest", "--keep", "32", "--option", "page=16"]) == 0
    out = capsys.readouterr().out
    assert "    1  dense             8193" in out and "    2  sparse (pages)    33" in out, out
    report = tpc_api.inspect(str(directory), method="quest", keep=32, options="page=16")
    per_position = 2 * 2 * 8 * 4  # keys and values of 2 KV heads of width 8, float32
    # layers 0-1 read the cache and the new token; layers 2-3 two pages, the new token and 512 pages' bounds
    assert report.kv_bytes(8192) == (2 * 8193 + 2 * (33 + 512)) * per_position
    assert main(["passes"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("quest"))
    assert "decoder LMs, decode step" in line


def assert_saved_program_runs_other_lengths(sparse, path):
    """The step's .pt2, loaded back, gives the module's logits at cache lengths 5 and 40 (a padded example)."""
    from tpc.pt2 import load_program

    program = load_program(path).module()
    gen = torch.Generator().manual_seed(2)
    for length in (5, 40):
        past = [torch.randn(2, 2, length, 8, generator=gen) for _ in range(8)]
        mask = torch.ones(2, length + 1, dtype=torch.long)
        mask[1, :3] = 0
        inputs = (torch.tensor([[5], [7]]), torch.full((2, 1), length), mask, past,
                  bounds_for(sparse.plan, past, mask))
        torch.testing.assert_close(program(*inputs)[0], sparse.step(*inputs)[0])


@pytest.mark.slow
def test_a_ratio_step_with_the_default_page_is_written_as_pt2_and_runs_other_lengths(captured, tmp_path):
    """Pages of 16 (the default) over the .pt2's example cache: it was one page, which torch.export
    specialized (an internal error); the program then runs other cache lengths as the module does."""
    model, sparse = quest(captured, keep=0.3, options={})
    assert sparse.plan.page == 16
    assert sparse.save(tmp_path / "dec.pt2") is not None
    assert_saved_program_runs_other_lengths(sparse, tmp_path / "dec.pt2")


@pytest.mark.slow
def test_cli_compiles_a_checked_quest_step(tmp_path, capsys):
    from decode_reference import quest_step as reference
    from tpc.cli import main
    from tpc.pt2 import load_program

    directory, out = tmp_path / "llama", tmp_path / "dec.pt2"
    model = tiny("llama")
    model.save_pretrained(directory)
    capsys.readouterr()
    assert main(["compile", str(directory), "--pass", "quest", "--keep", "3", "--option", "page=2", "-o",
                 str(out)]) == 0
    assert "max abs error" in capsys.readouterr().out
    token, position, valid, past = _random_step(model)
    flat = [t for kv in past for t in kv]
    with torch.no_grad():
        bounds = [tpc.page_bounds(flat[2 * layer], valid[:, None, None], 2) for layer in (2, 3)]
        logits = load_program(out).module()(token, position, valid.long(), flat, bounds)[0]
        expected, _ = reference(model, token, position, valid, past, layers=[2, 3], keep=3, page=2)
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("command", ["inspect", "compile"])
@pytest.mark.parametrize("flag", [["--r", "4"], ["--restore"], ["--prefix", "1"], ["--after", "block"]])
def test_encoder_flags_are_refused_by_inspect_as_by_compile(tmp_path, capsys, command, flag):
    """`tpc inspect --pass quest --r 4` printed the plan of the default budget, ignoring --r."""
    from tpc.cli import main

    out = ["-o", str(tmp_path / "dec.pt2")] if command == "compile" else []
    assert main([command, str(tmp_path / "never-loaded"), "--pass", "quest", *flag, *out]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "takes method, layers, keep and options only" in err[0], err


@pytest.mark.slow
def test_bench_of_a_decode_step_names_it_as_inspect_does(captured, tmp_path, capsys):
    """`tpc bench dec.pt2` said 'already pruned by tpc: compile the original model with the combined
    schedule (--layers/--keep over all layers)', advice for an encoder's artifact."""
    from tpc.cli import main

    _, sparse = quest(captured)
    sparse.save(tmp_path / "dec.pt2")
    capsys.readouterr()
    assert main(["bench", str(tmp_path / "dec.pt2"), "--batch", "1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is a decode step tpc wrote" in err[0], err
