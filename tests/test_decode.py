"""Decode-time sparse attention (TidalDecode) on stock Llama, Qwen2 and Mistral decode steps:
keep-everything identity through generate(), batches against single examples, the selected
positions and step logits against slow references, what the sparse layers read, golden text,
and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx

from decode_reference import tidal_step
from tpc.decode import compile_decoder
from tpc.decode.graph import step_symbols
from tpc.errors import TpcError
from tpc.graph.printing import format_rewrites

transformers = pytest.importorskip("transformers")
GOLDEN = Path(__file__).parent / "golden"
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}


def tiny(family: str, layers: int = 4):
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return model_class(config).eval()


@pytest.fixture
def captured(decode_capture):
    """One capture per family and worker, reused by every rewrite (conftest's ``decode_capture``)."""
    return decode_capture


def prompts(batch=2, length=10, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1:, :4] = 0  # the second example is 4 tokens shorter: left padding
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_a_budget_over_the_cache_generates_the_dense_tokens(captured, family):
    model, program = captured(family)
    dense = compile_decoder(model, layers=[1, 2], keep=64, program=program)
    ids, mask = prompts()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(dense.generate(ids, mask, max_new_tokens=8, do_sample=False), expected)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20,
                                  temperature=0.8)
    torch.manual_seed(5)
    assert torch.equal(dense.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8),
                       expected)


def test_a_batch_generates_what_each_example_generates_alone(captured):
    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=3, program=program)
    ids, mask = prompts()
    together = sparse.generate(ids, mask, max_new_tokens=6)
    for b in range(2):
        real = ids[b:b + 1, mask[b].bool()]
        alone = sparse.generate(real, torch.ones_like(real), max_new_tokens=6)
        assert torch.equal(together[b, -6:], alone[0, -6:])


@pytest.mark.slow
def test_the_number_of_new_tokens_is_model_generate_s(captured):
    """Neither max_new_tokens nor max_length (the tiny model's generation_config sets neither): 20 new tokens, as
    model.generate() draws (once a TypeError); a max_length the prompt already fills is refused, as
    model.generate() refuses it (once the prompt came back silently)."""
    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=64, program=program)
    ids, mask = prompts()
    assert model.generation_config.max_length is None and model.generation_config.max_new_tokens is None
    with torch.no_grad():
        assert torch.equal(sparse.generate(ids, mask), model.generate(input_ids=ids, attention_mask=mask))
        assert torch.equal(sparse.generate(ids, mask, max_length=13),
                           model.generate(input_ids=ids, attention_mask=mask, max_length=13))
    for length in (3, 10):
        with pytest.raises(TpcError, match=f"max_length {length} leaves no room for a new token after the 10-token "
                                           "prompts: set max_new_tokens") as err:
            sparse.generate(ids, mask, max_length=length)
        assert "\n" not in str(err.value)


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps what the selection ops chose and what each attention read."""

    def __init__(self, gm):
        super().__init__(gm)
        self.chosen, self.keys_read = [], []

    def run_node(self, node):
        out = super().run_node(node)
        if node.target is torch.ops.tpc.top_positions.default:
            self.chosen.append(out)
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            self.keys_read.append(self.env[node.args[1]].shape[2])
        return out


def _random_step(model, length=9):
    config = model.config
    gen = torch.Generator().manual_seed(7)
    width = config.hidden_size // config.num_attention_heads
    past = [(torch.randn(2, 2, length, width, generator=gen), torch.randn(2, 2, length, width, generator=gen))
            for _ in range(config.num_hidden_layers)]
    valid = torch.ones(2, length + 1, dtype=torch.bool)
    valid[1, :3] = False
    token = torch.tensor([[5], [9]])
    position = valid.long().sum(1, keepdim=True) - 1
    return token, position, valid, past


def test_selected_positions_and_step_logits_match_the_paper(captured):
    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=3, program=program)
    token, position, valid, past = _random_step(model)
    flat = [t for kv in past for t in kv]
    recorder = _Recorder(sparse.gm)
    with torch.no_grad():
        logits = recorder.run(token, position, valid.long(), flat)[0]
        expected, chosen = tidal_step(model, token, position, valid, past, selection=[1], keep=3)
    assert [c.tolist() for c in recorder.chosen] == [chosen[1]]
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
    assert recorder.keys_read == [10, 10, 4, 4]  # layers 2 and 3 read 3 positions + the new token


def test_a_ratio_selects_its_share_of_each_cache_length(captured):
    """keep=0.3: ceil(0.3 × L) positions at 9 and at 20 cached positions (3, then 6), the positions and the
    step logits those of the reference with that many; one compiled step serves both lengths."""
    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=0.3, program=program)
    for length, k in ((9, 3), (20, 6)):
        token, position, valid, past = _random_step(model, length)
        recorder = _Recorder(sparse.gm)
        with torch.no_grad():
            logits = recorder.run(token, position, valid.long(), [t for kv in past for t in kv])[0]
            expected, chosen = tidal_step(model, token, position, valid, past, selection=[1], keep=k)
        assert [c.tolist() for c in recorder.chosen] == [chosen[1]]
        torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
        assert recorder.keys_read == [length + 1, length + 1, k + 1, k + 1]


@pytest.mark.parametrize("method, options", [("tidal", None), ("quest", {"page": 3})])
def test_a_ratio_of_one_generates_the_dense_tokens(captured, method, options):
    model, program = captured("llama")
    sparse = compile_decoder(model, method=method, keep=1.0, options=options, program=program)
    ids, mask = prompts()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(sparse.generate(ids, mask, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.slow
def test_a_ratio_step_is_written_as_pt2_and_runs_other_lengths(captured, tmp_path):
    from tpc.pt2 import load_program

    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=0.3, program=program)
    assert sparse.save(tmp_path / "dec.pt2") is not None
    step = load_program(tmp_path / "dec.pt2").module()
    gen = torch.Generator().manual_seed(2)
    for length in (2, 40):  # 1 position, then 12
        past = [torch.randn(2, 2, length, 8, generator=gen) for _ in range(8)]
        mask = torch.ones(2, length + 1, dtype=torch.long)
        mask[1, :1] = 0
        inputs = (torch.tensor([[5], [7]]), torch.full((2, 1), length), mask, past)
        torch.testing.assert_close(step(*inputs)[0], sparse.step(*inputs)[0])


@pytest.mark.parametrize("method", ["tidal", "quest", "dhsa"])
@pytest.mark.parametrize("keep, words", [("0", "give a budget of 1 or more"), ("0.0", "keep ratio '0.0' is outside (0, 1]"),
                                         ("1.5", "keep ratio '1.5' is outside (0, 1]"),
                                         ("nan", "keep ratio 'nan' is outside (0, 1]"),
                                         ("-0.1", "keep ratio '-0.1' is outside (0, 1]"),
                                         ("x", "a number of cached positions such as 256 or a ratio")])
def test_cli_refuses_a_bad_ratio_in_one_line_before_loading(tmp_path, capsys, method, keep, words):
    from tpc.cli import main

    out = tmp_path / "dec.pt2"
    assert main(["compile", str(tmp_path / "never-loaded"), "--pass", method, "--keep", keep, "-o", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_only_gathers_read_the_sparse_layers_cache(captured):
    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=3, program=program)
    placeholders = [n for n in sparse.gm.graph.nodes if n.op == "placeholder"][3:]
    for layer in sparse.plan.sparse:
        for past in placeholders[2 * layer:2 * layer + 2]:
            assert _readers(past) == [torch.ops.tpc.gather_positions.default]
    assert _readers(placeholders[0]) == [torch.ops.aten.cat.default]  # layer 0 is dense


def _readers(node):
    """Ops that read the node's data (not export's shape guards, not sizes)."""
    return [u.target for u in node.users if u.op == "call_function" and u.target is not torch.ops.aten.sym_size.int]


def test_golden_decode_step(captured, update_golden):
    model, program = captured("llama")
    gm = compile_decoder(model, layers=[1], keep=3, program=program).gm
    text = format_rewrites(gm, step_symbols(gm))
    path = GOLDEN / "decode_tidal_llama.txt"
    if update_golden:
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed: review, then run pytest --update-golden"


@pytest.mark.parametrize("settings, message", [
    ({"keep": 0}, "give a budget of 1 or more"),
    ({"layers": [1, 4]}, "selection layer 4 is out of range: the model has 4 decoder layers"),
    ({"layers": [3]}, "leaves no layer to read"),
    ({"method": "quest2"}, "not a decode-time method"),
    ({"keep": 1.5}, "keep ratio 1.5 is outside \\(0, 1\\]"),
    ({"keep": float("nan")}, "keep ratio nan is outside \\(0, 1\\]"),
    ({"keep": -0.1}, "keep ratio -0.1 is outside \\(0, 1\\]"),
    ({"keep": 0.0}, "keep ratio 0.0 is outside \\(0, 1\\]"),
])
def test_bad_settings_are_refused_before_capture(settings, message):
    with pytest.raises(TpcError, match=message):
        compile_decoder(tiny("llama"), **settings)


def test_a_model_without_a_kv_cache_is_refused():
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    with pytest.raises(TpcError, match="BertForMaskedLM has no KV cache"):
        compile_decoder(transformers.BertForMaskedLM(config))


@pytest.mark.slow
def test_right_padding_is_refused(captured):
    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=3, program=program)
    ids, mask = prompts()
    with pytest.raises(TpcError, match="right-padded"):
        sparse.generate(ids, mask.flip(1), max_new_tokens=2)


@pytest.mark.parametrize("call, words", [
    (lambda ids, mask: (ids[:0], mask[:0]), "hold no prompt"),
    (lambda ids, mask: (ids[0], None), "must be \\[batch, tokens\\]"),
    (lambda ids, mask: (ids.float(), mask), "token ids are integers"),
    (lambda ids, mask: (ids + 200, mask), "outside the model's vocabulary"),
    (lambda ids, mask: (ids, mask[:, :5]), "does not match input_ids"),
    (lambda ids, mask: (ids, mask * 7), "values other than 0 and 1"),
    (lambda ids, mask: (ids, mask * 0), "all padding"),
])
@pytest.mark.slow
def test_bad_prompts_are_refused_in_one_line(captured, call, words):
    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=3, program=program)
    with pytest.raises(TpcError, match=words):
        sparse.generate(*call(*prompts()), max_new_tokens=2)


def test_generate_without_a_mask_masks_the_pad_tokens_as_hf(captured):
    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=64, program=program)
    ids, mask = prompts()
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(sparse.generate(ids, max_new_tokens=4), expected)
    with pytest.raises(TpcError, match="max_new_tokens"):
        sparse.generate(ids, max_new_tokens=0)


@pytest.mark.slow
def test_generate_past_a_sliding_window_is_refused():
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = transformers.MistralForCausalLM(config).eval()
    sparse = compile_decoder(model, layers=[0], keep=64)
    ids = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    assert torch.equal(sparse.generate(ids, max_new_tokens=2), expected)  # within the window
    with pytest.raises(TpcError, match="sliding window of 8 tokens"):
        sparse.generate(ids, max_new_tokens=3)


def test_the_decode_ops_match_loops_and_their_fakes():
    gen = torch.Generator().manual_seed(1)
    cache, index = torch.randn(2, 3, 7, 4, generator=gen), torch.randint(0, 7, (2, 3, 5), generator=gen)
    gathered = torch.ops.tpc.gather_positions(cache, index)
    for b, h, j in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(5)).tolist():
        assert torch.equal(gathered[b, h, j], cache[b, h, index[b, h, j]])
    q, keys = torch.randn(2, 6, 1, 4, generator=gen), torch.randn(2, 3, 8, 4, generator=gen)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    mask[1, ..., :2] = False
    scores = torch.ops.tpc.group_attention(q, keys, mask, 0.5)
    for b, h, j in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(8)).tolist():
        mass = sum(torch.softmax((q[b, g, 0] @ keys[b, h].T * 0.5).masked_fill(~mask[b, 0, 0], float("-inf")), 0)[j]
                   for g in (2 * h, 2 * h + 1))
        torch.testing.assert_close(scores[b, h, j], mass)
    assert torch.ops.tpc.top_positions(scores, 20).shape == (2, 3, 7)  # the budget is clamped to the cache
    for op, args in [(torch.ops.tpc.gather_positions.default, (cache, index)),
                     (torch.ops.tpc.group_attention.default, (q, keys, mask, 0.5)),
                     (torch.ops.tpc.top_positions.default, (scores, 3))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_cli_compiles_a_checked_decode_step_and_inspects_it(tmp_path, capsys):
    from tpc.cli import main
    from tpc.pt2 import load_program

    directory, out = tmp_path / "llama", tmp_path / "dec.pt2"
    model = tiny("llama")
    model.save_pretrained(directory)
    capsys.readouterr()
    assert main(["compile", str(directory), "--pass", "tidal", "--layers", "1", "--keep", "3", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 sparse layers reading 3 positions" in text and "max abs error" in text
    token, position, valid, past = _random_step(model)
    with torch.no_grad():
        logits = load_program(out).module()(token, position, valid.long(), [t for kv in past for t in kv])[0]
        expected, _ = tidal_step(model, token, position, valid, past, selection=[1], keep=3)
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
    assert main(["inspect", str(directory), "--pass", "tidal", "--layers", "2", "--keep", "3"]) == 0
    assert "    3  sparse            4" in capsys.readouterr().out
    for args in (["inspect", str(out)], ["compile", str(out), "--pass", "tidal", "-o", str(tmp_path / "again.pt2")]):
        assert main(args) == 1
        assert "is a decode step tpc wrote" in capsys.readouterr().err


def test_a_decode_step_is_not_inspected_as_a_prompt_model(captured):
    import tpc

    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=3, program=program)
    token, position, valid, past = _random_step(model)
    with pytest.raises(TpcError, match="is a decode step tpc wrote"):
        tpc.inspect(sparse.gm, (token, position, valid.long(), [t for kv in past for t in kv]))


def test_cli_refuses_a_decode_step_suffix_before_loading(cli, tmp_path):
    for method in ("tidal", "quest"):
        result = cli("compile", tmp_path / "no-such-model", "--pass", method, "-o", tmp_path / "dec.plan")
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "TensorRT engines are written for encoders only; write the decode step" in result.stderr
    for out, words in ((tmp_path / "x.json", "unknown artifact type '.json'"), (tmp_path / "x", "type '(none)'")):
        result = cli("compile", tmp_path / "no-such-model", "--pass", "tidal", "-o", out)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert words in result.stderr and "is written as .pt2 or .onnx" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, words", [
    (["--keep", "0"], "give a budget of 1 or more"),
    (["--keep", "99999999999999999999999"], "more than the 1048576 cached positions"),
    (["--layers", "9"], "selection layer 9 is out of range"),
])
def test_cli_bad_settings_give_one_line_and_no_file(tmp_path, capsys, args, words):
    from tpc.cli import main

    directory, out = tmp_path / "llama", tmp_path / "dec.pt2"
    tiny("llama").save_pretrained(directory)
    capsys.readouterr()
    assert main(["compile", str(directory), "--pass", "tidal", *args, "-o", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and words in err[0]
    assert not out.exists()


def test_passes_lists_tidal_where_it_applies(capsys):
    from tpc.cli import main

    assert main(["passes"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tidal"))
    assert "decoder LMs, decode step" in line


def test_bench_refuses_a_context_over_the_step_limit_before_allocating(cli, tmp_path):
    tiny("llama").save_pretrained(tmp_path / "llama")
    result = cli("bench", tmp_path / "llama", "--pass", "tidal", "--layers", "1", "--keep", "3", "--context",
                 "64,99999999999")
    assert result.returncode == 1 and "--context 99999999999: a decode step takes at most 1048576" in result.stderr


def test_a_rewritten_step_that_will_not_re_export_is_tpc_s_bug(captured, tmp_path, monkeypatch):
    """torch.export captured the step once; failing on tpc's rewrite of it is tpc's bug, as for
    encoders and the VLM prefill, whoever's frame raised it (here a stand-in outside tpc)."""
    from tpc.errors import TpcInternalError

    model, program = captured("llama")
    sparse = compile_decoder(model, layers=[1], keep=3, program=program)

    def refuses(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.export, "export", refuses)
    with pytest.raises(TpcInternalError, match="could not re-export the rewritten decode step: RuntimeError"):
        sparse.save(tmp_path / "dec.pt2")
    assert not list(tmp_path.iterdir())
