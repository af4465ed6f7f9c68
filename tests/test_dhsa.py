"""DHSA (chunk-level selection at decode time) on stock Llama and Qwen2 decode steps: the positions
each dhsa layer reads and the step logits against a slow reference written from the paper, what
the sparse layers' attention reads, the chunk summaries kept beside the cache, keep-everything
identity through generate(), batches against single examples, the chunk ops against loops and
their fakes, golden text, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx

from decode_reference import dhsa_chunks, dhsa_positions, dhsa_step
from test_decode import _random_step, _readers, prompts, tiny
from tpc.decode import compile_decoder
from tpc.decode.chunks import ChunkState, chunks_for
from tpc.decode.graph import step_symbols
from tpc.decode.plan import Plan
from tpc.errors import TpcError
from tpc.graph.printing import format_rewrites

transformers = pytest.importorskip("transformers")
GOLDEN = Path(__file__).parent / "golden"
tpc = torch.ops.tpc
CHUNKS = {"min_chunk": 2, "max_chunk": 4, "threshold": 0.0}  # random keys of width 8: boundaries at about half


@pytest.fixture
def captured(decode_capture):
    """One capture per family and worker, shared with test_decode and test_quest (conftest's ``decode_capture``)."""
    return decode_capture


def dhsa(captured, family="llama", **settings):
    model, program = captured(family)
    settings = {"keep": 3, "options": CHUNKS, **settings}
    return model, compile_decoder(model, method="dhsa", program=program, **settings)


class _Reads(fx.Interpreter):
    """Runs the graph; per dhsa layer, the cached positions its attention may read (gathered and not
    masked), and per attention the number of key positions it is given."""

    def __init__(self, gm):
        super().__init__(gm)
        self.positions, self.keys_read = [], []
        self._index = None

    def run_node(self, node):
        out = super().run_node(node)
        if node.target is tpc.chunk_positions.default:
            self._index = out
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            self.keys_read.append(self.env[node.args[1]].shape[2])
            mask = self.env[node.args[3]]
            if self._index is not None and mask.shape[1] > 1:  # a dhsa layer's mask over its gathered positions
                allowed = mask[:, :, 0, :-1]
                self.positions.append([[sorted({int(j) for j, ok in zip(self._index[b, h], allowed[b, h]) if ok})
                                        for h in range(mask.shape[1])] for b in range(mask.shape[0])])
        return out


def _run(sparse, token, position, valid, past):
    flat = [t for kv in past for t in kv]
    reads = _Reads(sparse.gm)
    with torch.no_grad():
        logits = reads.run(token, position, valid.long(), flat, chunks_for(sparse.plan, flat, valid.long()))[0]
    return reads, logits


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_read_positions_and_step_logits_match_the_paper(captured, family):
    """Default dhsa layers (2 and 3 of 4), a budget of 3 positions, chunks of 2-4 positions cut where
    adjacent keys' similarity is below 0; 9 cached positions, the second example's first 3 padding."""
    model, sparse = dhsa(captured, family)
    assert sparse.plan.sparse == [2, 3]
    token, position, valid, past = _random_step(model)
    lengths = {len(c) for row in dhsa_chunks(past[2][0], valid, 2, 4, 0.0) for c in row}
    assert len(lengths) > 1, lengths  # the chunks' lengths vary: the boundary rule is exercised
    reads, logits = _run(sparse, token, position, valid, past)
    with torch.no_grad():
        expected, chosen = dhsa_step(model, token, position, valid, past, layers=[2, 3], keep=3, **CHUNKS)
    assert reads.positions == [chosen[2], chosen[3]]
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
    assert reads.keys_read == [10, 10, 4, 4]  # layers 2 and 3: the 3 positions of the budget + the new token


def test_a_ratio_reads_its_share_of_each_cache_length(captured):
    """keep=0.3: ceil(0.3 × L) positions, 3 at 9 cached positions, 5 at 14; positions and logits those
    of the reference with that budget."""
    model, sparse = dhsa(captured, keep=0.3)
    for length, k in ((9, 3), (14, 5)):
        token, position, valid, past = _random_step(model, length)
        reads, logits = _run(sparse, token, position, valid, past)
        with torch.no_grad():
            expected, chosen = dhsa_step(model, token, position, valid, past, layers=[2, 3], keep=k, **CHUNKS)
        assert reads.positions == [chosen[2], chosen[3]]
        torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
        assert reads.keys_read == [length + 1, length + 1, k + 1, k + 1]
        assert sparse.report.positions_read(2, length) == k + 1


def test_only_gathers_read_the_dhsa_layers_cache(captured):
    """A dhsa layer's cached keys and values are read by the gathers alone (its chunks are scored from
    their summaries, step inputs kept beside the cache), never by a full-cache attention."""
    _, sparse = dhsa(captured)
    placeholders = [n for n in sparse.gm.graph.nodes if n.op == "placeholder"][3:]
    past, chunks = placeholders[:8], placeholders[8:]
    for layer in sparse.plan.sparse:
        for cache in past[2 * layer:2 * layer + 2]:
            assert _readers(cache) == [tpc.gather_positions.default]
    assert [_readers(c) for c in chunks] == [[tpc.chunk_scores.default],
                                             [tpc.chunk_scores.default, tpc.chunk_positions.default]] * 2
    assert _readers(past[0]) == [torch.ops.aten.cat.default]  # layer 0 is dense


def _keys_with_drops(length=16):
    """Keys [2, 2, length, 4] whose adjacent similarity drops at chosen places: runs of one direction (adjacent
    runs orthogonal or opposite), a little noise."""
    gen = torch.Generator().manual_seed(4)
    base = torch.cat([torch.eye(4), -torch.eye(4)[:2]])
    runs = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 4, 4, 5, 5][:length]
    keys = torch.stack([base[r] for r in runs], 0) + 0.05 * torch.randn(length, 4, generator=gen)
    return torch.stack([keys, keys.flip(-1)])[:, None].expand(2, 2, length, 4).contiguous()


def test_the_chunks_kept_beside_the_cache_are_those_of_its_keys():
    """ChunkState after the prompt and after each of 9 new tokens (chunks of 2-4 positions, keys in runs
    of one direction; the second example has 3 positions of left padding) equals tpc::chunk_summary of
    the whole cache."""
    plan = Plan("dhsa", 2, (1,), 3, chunk=(2, 4, 0.5))
    keys = _keys_with_drops()
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :3] = 0
    zeros = torch.zeros(2, 2, 7, 4)
    kept = ChunkState(plan, [zeros, zeros, keys[:, :, :7], zeros], mask[:, :8], capacity=16)
    for length in range(7, 16):
        reps, spans = tpc.chunk_summary(keys[:, :, :length], mask[:, None, None, :length + 1].bool(), 2, 4, 0.5)
        got = kept.views()
        assert torch.equal(got[1], spans), length
        torch.testing.assert_close(got[0], reps)
        kept.append((None, None, keys[:, :, length:length + 1], None))
    # at 15 positions: runs 0, 1, 2 (6 positions: cut at 4), 3 (1 position: joined by 4, being under min_chunk), 5
    assert spans[0].T.tolist() == [[0, 3], [3, 2], [5, 4], [9, 2], [11, 3], [14, 1], [0, 0], [0, 0]]


def test_generate_hands_every_step_the_chunks_of_its_cache(captured):
    """generate()'s ChunkState, kept beside the KV buffer, matches tpc::chunk_summary of the cache each step
    is given: a left-padded batch for 7 steps, then a second generate() on the same module."""
    _, sparse = dhsa(captured, layers=[1, 2, 3])
    ids, mask = prompts()
    run, checked = sparse.step, []

    def step(input_ids, position_ids, attention_mask, past, bounds=None):
        expected = chunks_for(sparse.plan, past, attention_mask)
        checked.append(all(torch.equal(b, e) if e.dtype == torch.int64 else torch.allclose(b, e, atol=1e-5)
                           for b, e in zip(bounds, expected, strict=True)))
        return run(input_ids, position_ids, attention_mask, past, bounds)

    sparse.step = step
    sparse.generate(ids, mask, max_new_tokens=8, eos_token_id=None)
    sparse.generate(ids[1:, 4:], mask[1:, 4:], max_new_tokens=5, eos_token_id=None)
    assert checked == [True] * (7 + 4)


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_a_budget_over_the_cache_generates_and_samples_the_dense_tokens(captured, family):
    model, sparse = dhsa(captured, family, keep=64, layers=[0, 1, 2, 3])
    ids, mask = prompts()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(sparse.generate(ids, mask, max_new_tokens=6, do_sample=False), expected)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20,
                                  temperature=0.8)
    torch.manual_seed(5)
    assert torch.equal(sparse.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8),
                       expected)


def test_a_batch_generates_what_each_example_generates_alone(captured):
    """The second example has 4 positions of left padding: its chunks start at its first token, so it
    reads the same positions in the batch as alone."""
    _, sparse = dhsa(captured, layers=[1, 2, 3])
    ids, mask = prompts()
    together, logits = sparse.generate(ids, mask, max_new_tokens=6), _first_step_logits(sparse, ids, mask)
    for b in range(2):
        real = ids[b:b + 1, mask[b].bool()]
        alone = sparse.generate(real, torch.ones_like(real), max_new_tokens=6)
        assert torch.equal(together[b, -6:], alone[0, -6:])
        torch.testing.assert_close(logits[b:b + 1], _first_step_logits(sparse, real, torch.ones_like(real)),
                                   atol=1e-5, rtol=1e-5)


def _first_step_logits(sparse, ids, mask):
    logits, cache, positions = sparse.prefill(ids, mask)
    past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    full = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return sparse.step(logits.argmax(-1, keepdim=True), positions[:, -1:] + 1, full, past)[0]


def test_golden_decode_step(captured, update_golden):
    _, sparse = dhsa(captured, layers=[3])
    text = format_rewrites(sparse.gm, step_symbols(sparse.gm))
    path = GOLDEN / "decode_dhsa_llama.txt"
    if update_golden:
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed: review, then run pytest --update-golden"


def test_the_chunk_ops_match_loops_and_their_fakes():
    """Chunks of 2-4 positions (threshold 0) over 9 cached positions of random keys, the second example's
    first 3 positions padding: summaries, scores and positions against loops over examples, heads, chunks
    and positions; a budget over an example's positions points its extra slots at padding."""
    gen = torch.Generator().manual_seed(1)
    keys, q = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 4, 1, 8, generator=gen)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., :3] = False
    valid = mask[:, 0, 0]
    reps, spans = tpc.chunk_summary(keys, mask, 2, 4, 0.0)
    assert reps.shape == (2, 2, 5, 8) and spans.shape == (2, 2, 5)
    chunks = dhsa_chunks(keys, valid, 2, 4, 0.0)
    scores = tpc.chunk_scores(q, reps, spans)
    for b in range(2):
        assert spans[b].T.tolist() == [[c[0], len(c)] for c in chunks[b]] + [[0, 0]] * (5 - len(chunks[b]))
        for h in range(2):
            for n, members in enumerate(chunks[b]):
                mean = [sum(float(keys[b, h, j, d]) for j in members) / len(members) for d in range(8)]
                assert reps[b, h, n].tolist() == pytest.approx([len(members) ** 0.5 * m for m in mean], rel=1e-5)
                score = sum(float(q[b, 2 * h + g, 0, d]) * float(reps[b, h, n, d]) for g in (0, 1) for d in range(8))
                assert float(scores[b, h, n]) == pytest.approx(score, rel=1e-5, abs=1e-6)
            assert all(float(s) == float("-inf") for s in scores[b, h, len(chunks[b]):])
    for keep in (1, 3, 7, 9):
        index = tpc.chunk_positions(scores, spans, mask, keep)
        expected = dhsa_positions(q, keys, valid, keep, 2, 4, 0.0)
        for b in range(2):
            for h in range(2):
                got = index[b, h].tolist()
                assert [j for j in got if valid[b, j]] == expected[b][h]
                assert all(j == 0 for j in got if not valid[b, j])  # extra slots: the first padding position
    assert tpc.chunk_positions(scores, spans, mask, 40).shape == (2, 2, 9)  # the budget is clamped to the cache
    for op, args in [(tpc.chunk_summary.default, (keys, mask, 2, 4, 0.0)),
                     (tpc.chunk_scores.default, (q, reps, spans)),
                     (tpc.chunk_positions.default, (scores, spans, mask, 3)),
                     (tpc.chunk_positions.default, (scores, spans, torch.zeros(2, 1, 1, 10).masked_fill(~mask, -1e9),
                                                    3))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("settings, message", [
    ({"keep": 0}, "give a budget of 1 or more"),
    ({"keep": 1.5}, "keep ratio 1.5 is outside"),
    ({"options": {"min_chunk": 0}}, "option min_chunk is a number of positions \\(1 or more\\), not 0"),
    ({"options": {"max_chunk": 2.5}}, "option max_chunk is a number of positions \\(1 or more\\), not 2.5"),
    ({"options": {"min_chunk": 8, "max_chunk": 4}}, "option max_chunk \\(4\\) is less than min_chunk \\(8\\)"),
    ({"options": {"threshold": 2}}, "option threshold must be a number in \\[-1.0, 1.0\\], not 2"),
    ({"options": {"threshold": "x"}}, "option threshold must be a number"),
    ({"options": {"max_chunk": 10**9}}, "option max_chunk 1000000000 is more than the 1048576 cached positions"),
    ({"options": {"chunk": 4}}, "dhsa has no option 'chunk'; its options: min_chunk \\(default 8\\)"),
    ({"layers": [1, 4]}, "sparse layer 4 is out of range: the model has 4 decoder layers"),
])
def test_bad_settings_are_refused_before_capture(settings, message):
    with pytest.raises(TpcError, match=message):
        compile_decoder(tiny("llama"), method="dhsa", **settings)


@pytest.mark.parametrize("args, words", [
    (["--option", "min_chunk=0"], "option min_chunk is a number of positions (1 or more), not 0"),
    (["--option", "threshold=x"], "option threshold must be a number in [-1.0, 1.0], not 'x'"),
    (["--keep", "0"], "give a budget of 1 or more"),
    (["--layers", "9"], None),
])
def test_cli_bad_settings_give_one_line_and_no_file(tmp_path, capsys, args, words):
    from tpc.cli import main

    out = tmp_path / "dec.pt2"
    directory = tmp_path / "llama"
    if words is None:  # a layer out of range is known once the model is loaded
        tiny("llama").save_pretrained(directory)
        capsys.readouterr()
        words = "sparse layer 9 is out of range: the model has 4 decoder layers"
    assert main(["compile", str(directory), "--pass", "dhsa", *args, "-o", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_inspect_and_passes_say_which_layers_read_chunks(tmp_path, capsys):
    import tpc as tpc_api
    from tpc.cli import main

    directory = tmp_path / "llama"
    tiny("llama").save_pretrained(directory)
    capsys.readouterr()
    assert main(["inspect", str(directory), "--pass", "dhsa", "--keep", "32", "--option", "min_chunk=16"]) == 0
    out = capsys.readouterr().out
    assert "    1  dense             8193" in out and "    2  sparse (chunks)   33" in out, out
    report = tpc_api.inspect(str(directory), method="dhsa", keep=32, options="min_chunk=16,max_chunk=32")
    per_position = 2 * 2 * 8 * 4  # keys and values of 2 KV heads of width 8, float32
    # layers 0-1 read the cache and the new token; layers 2-3 32 positions, the new token and 512 chunk slots
    # (a float32 key per KV head, a start and a length)
    assert report.kv_bytes(8192) == (2 * 8193 + 2 * 33) * per_position + 2 * 512 * (2 * 8 * 4 + 16)
    assert main(["passes"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dhsa"))
    assert "decoder LMs, decode step" in line


@pytest.mark.slow
def test_the_step_is_written_as_pt2_and_runs_other_lengths(captured, tmp_path):
    """The .pt2 of a ratio step (chunk slots symbolic), loaded back, gives the module's logits at cache
    lengths 5 and 40 with a padded example."""
    from tpc.pt2 import load_program

    _, sparse = dhsa(captured, keep=0.3)
    assert sparse.save(tmp_path / "dec.pt2") is not None
    program = load_program(tmp_path / "dec.pt2").module()
    gen = torch.Generator().manual_seed(2)
    for length in (5, 40):
        past = [torch.randn(2, 2, length, 8, generator=gen) for _ in range(8)]
        mask = torch.ones(2, length + 1, dtype=torch.long)
        mask[1, :3] = 0
        inputs = (torch.tensor([[5], [7]]), torch.full((2, 1), length), mask, past, chunks_for(sparse.plan, past, mask))
        torch.testing.assert_close(program(*inputs)[0], sparse.step(*inputs)[0])


def test_a_mask_with_a_hole_inside_a_prompt_is_refused_in_one_line(decode_capture):
    """A chunk is a span of consecutive positions: a masked position after the first real token would sit
    inside one and be read (while the chunk's last real position is dropped)."""
    model, program = decode_capture("llama")
    sparse = compile_decoder(model, method="dhsa", keep=4, options={"min_chunk": 2, "max_chunk": 4}, program=program)
    ids, mask = prompts()
    mask[0, 3] = 0
    with pytest.raises(TpcError, match="dhsa takes left-padded prompts only: example 0's attention_mask is 0 at "
                                       "position 3, after its first real token"):
        sparse.generate(ids, mask, max_new_tokens=2)
