"""Compressed KV caches (streaming, h2o, snapkv, scissorhands): kept positions against the papers'
slow references (tests/kv_reference.py), physical sizes, positions, batches, the dense identity."""

from __future__ import annotations

import pytest
import torch

from kv_reference import run
from test_decode import prompts
from tpc.decode import capture_step, compile_compressed, compressed_cache
from tpc.errors import TpcError

transformers = pytest.importorskip("transformers")

METHODS = ["streaming", "h2o", "snapkv", "scissorhands"]
SMALL = {"streaming": {"sinks": 2}, "h2o": {"recent": 2}, "snapkv": {"window": 2, "kernel": 3},
         "scissorhands": {"recent": 2, "history": 3}}


def tiny(layers: int = 3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def captured():
    """One chunked capture for the module (the capture is the slow part)."""
    model = tiny()
    return model, capture_step(model, chunk=True)


@pytest.fixture(scope="module")
def compiled(captured):
    """``compile_compressed`` on the module's capture, each setting rewritten once."""
    model, program = captured
    done = {}

    def get(method, keep, options=None):
        key = (method, keep, tuple(sorted((options or {}).items())))
        if key not in done:
            done[key] = compile_compressed(model, method=method, keep=keep, options=options, program=program)
        return done[key]

    return get


def kept(cache):
    """Per layer, per example, per KV head: the sequence indices kept (padding slots left out)."""
    return [[[[j for j in head if j >= 0] for head in example] for example in layer.positions.tolist()]
            for layer in cache.layers]


@pytest.mark.parametrize("method", [m if m == "h2o" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_a_budget_over_the_prompt_is_the_dense_model(captured, compiled, method):
    model, _ = captured
    ids, mask = prompts()
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        torch.manual_seed(5)
        sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=20)
    dense = compiled(method, 64, SMALL[method])
    torch.testing.assert_close(dense.prefill(ids, mask)[0], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(dense.generate(ids, mask, max_new_tokens=4, do_sample=False), greedy)
    torch.manual_seed(5)
    assert torch.equal(dense.generate(ids, mask, max_new_tokens=4, do_sample=True, top_k=20), sampled)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_kept_positions_follow_the_paper_after_the_prompt_and_each_new_token(captured, compiled, method):
    model, _ = captured
    budget, steps = 5, 4
    compressed = compiled(method, budget, SMALL[method])
    ids, mask = prompts()
    logits, cache = compressed.prefill(ids, mask)
    phases, tokens = [kept(cache)], []
    for n in range(steps):
        token = logits.argmax(-1)[:, None]
        tokens.append(token)
        assert cache.get_seq_length() == 10 + n
        logits = compressed.step(cache, token)
        phases.append(kept(cache))
        grows = n + 1 if method == "snapkv" else 0  # SnapKV evicts at the end of the prompt only
        assert tuple(cache.layers[0].keys.shape) == (2, 2, budget + grows, 8)  # the budget, not the context
    tokens.append(logits.argmax(-1)[:, None])
    for b in range(2):
        pad = int((mask[b] == 0).sum())
        expected, generated = run(model, ids[b, pad:].tolist(), method, budget, SMALL[method], steps, first=pad)
        assert generated == torch.cat(tokens, 1)[b].tolist()
        for phase, want in zip(phases, expected):
            assert [layer[b] for layer in phase] == want


@pytest.mark.slow
def test_a_prompt_or_budget_under_the_step_s_smallest_mask_runs(captured, compiled):
    """torch.export raised the captured step's smallest attention mask to 4 positions: a prompt of
    1-2 tokens and a budget of 2 were a guard AssertionError. Now the dense cache generates as the
    stock model does, and a budget of 2 keeps what the paper's slow reference keeps."""
    model, _ = captured
    ids, _ = prompts()
    dense = compiled("h2o", 64, SMALL["h2o"])
    for n in (1, 2):
        with torch.no_grad():
            want = model.generate(input_ids=ids[:1, :n], max_new_tokens=3, do_sample=False)
        assert torch.equal(dense.generate(ids[:1, :n], max_new_tokens=3), want)
    compressed = compiled("streaming", 2, {"sinks": 1})
    logits, cache = compressed.prefill(ids[:1, :4])
    phases, tokens = [kept(cache)], []
    for _ in range(2):
        tokens.append(logits.argmax(-1)[:, None])
        logits = compressed.step(cache, tokens[-1])
        phases.append(kept(cache))
    expected, generated = run(model, ids[0, :4].tolist(), "streaming", 2, {"sinks": 1}, 2)
    assert generated[:2] == torch.cat(tokens, 1)[0].tolist()
    assert [[layer[0] for layer in phase] for phase in phases] == expected


@pytest.mark.slow
def test_positions_of_new_tokens_ignore_eviction(captured):
    """The n-th generated token is at rotary position prompt length + n, whatever was evicted."""
    model, program = captured
    compressed = compile_compressed(model, method="h2o", keep=3, options={"recent": 1}, program=program)
    seen = []
    run_step = compressed._run

    def recording(ids, positions, mask, past):
        seen.append(positions[:, -1].tolist())
        return run_step(ids, positions, mask, past)

    compressed._run = recording
    ids, mask = prompts()
    compressed.generate(ids, mask, max_new_tokens=5)
    assert seen == [[9, 5]] + [[9 + n, 5 + n] for n in range(1, 5)]  # example 1: 6 real tokens


@pytest.mark.slow
def test_a_batch_evicts_each_example_as_it_would_alone(compiled):
    compressed = compiled("scissorhands", 4, SMALL["scissorhands"])
    ids, mask = prompts()
    together = compressed.generate(ids, mask, max_new_tokens=5)
    for b in range(2):
        real = ids[b:b + 1, mask[b].bool()]
        alone = compressed.generate(real, max_new_tokens=5)[0, real.shape[1]:]
        assert torch.equal(together[b, 10:10 + len(alone)], alone)


@pytest.mark.slow
def test_stock_generate_takes_the_streaming_cache_as_it_is(captured):
    model, program = captured
    ids, mask = prompts()
    cache = compressed_cache(model.config, "streaming", 5, SMALL["streaming"], attention_mask=mask)
    with torch.no_grad():
        stock = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=6,
                               do_sample=False)
    assert cache.get_seq_length() == 10 + 5 and cache.layers[0].keys.shape[2] == 5
    ours = compile_compressed(model, method="streaming", keep=5, options=SMALL["streaming"], program=program)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=6), stock)
    h2o = compressed_cache(model.config, "h2o", 5, attention_mask=mask)
    with pytest.raises(TpcError, match="h2o ranks cached positions by attention"):
        model.generate(input_ids=ids, attention_mask=mask, cache=h2o, max_new_tokens=2)


@pytest.mark.slow
def test_a_ratio_budget_is_a_share_of_the_prompt(compiled):
    ids, mask = prompts()
    _, cache = compiled("streaming", 0.5, SMALL["streaming"]).prefill(ids, mask)
    assert cache.layers[0].keys.shape[2] == 5  # half of the 10-token prompt
    with pytest.raises(TpcError, match="keep 1 is smaller than streaming's sinks of 2"):
        compiled("streaming", 0.1, SMALL["streaming"]).prefill(ids, mask)


@pytest.mark.slow
def test_bench_reports_the_bytes_each_cache_holds(compiled):
    from tpc.decode.kv_bench import bench_compressed

    result = bench_compressed(compiled("h2o", 4, SMALL["h2o"]), [2], [12], warmup=1, iters=1, repeats=1)
    row = result.rows[0]
    per_position = 2 * 3 * 2 * 8 * 4 * 2 / 2**20  # keys and values, 3 layers, 2 KV heads of 8, float32, batch 2
    assert (row.new, row.budget) == (2, 4)
    assert row.dense_prefill_mib == pytest.approx(12 * per_position) and row.kv_prefill_mib == pytest.approx(4 * per_position)
    assert row.dense_after_mib == pytest.approx(14 * per_position) and row.kv_after_mib == pytest.approx(4 * per_position)
    assert "budget 4 positions in each of the 3 layers" in result.table() and row.dense_ms > 0 and row.kv_ms > 0


@pytest.mark.parametrize("method, keep, options, words", [
    ("h2o", 0, None, "a budget of cached positions per layer \\(1 or more"),
    ("h2o", 1.5, None, "a ratio of the prompt in \\(0, 1\\]"),
    ("streaming", 4, {"sinks": 4}, "keep 4 is smaller than streaming's sinks of 4 plus a recent window of 1"),
    ("snapkv", 16, None, "keep 16 is smaller than snapkv's window of 32"),
    ("scissorhands", 8, None, "keep 8 is smaller than scissorhands's recent of 16"),
    ("snapkv", 64, {"kernel": 4}, "option kernel is the odd width"),
    ("tidal", 64, None, "not a KV-eviction method"),
])
def test_bad_budgets_are_refused_before_capture(method, keep, options, words):
    with pytest.raises(TpcError, match=words):
        compile_compressed(tiny(1), method=method, keep=keep, options=options)


def test_a_model_without_a_kv_cache_is_refused_naming_the_kv_cache():
    """A VLM or an encoder given --pass h2o was told that decode-time sparse attention needs a decoder LM."""
    from families import hf_bert

    with pytest.raises(TpcError, match="BertModel has no KV cache to decode from: decode-time sparse attention and a "
                                       "compressed KV cache take a decoder language model"):
        compile_compressed(hf_bert(), method="h2o", keep=8)


@pytest.mark.slow
def test_right_padding_is_refused(compiled):
    compressed = compiled("streaming", 5, SMALL["streaming"])
    ids, mask = prompts()
    with pytest.raises(TpcError, match="right-padded"):
        compressed.generate(ids, mask.flip(1), max_new_tokens=2)


def test_the_score_ops_match_loops_and_their_fakes():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 2, 6, 5, generator=gen)
    mask = torch.ones(2, 1, 3, 6, dtype=torch.bool).tril(3)
    mask[1, ..., :2] = False
    mass = torch.ops.tpc.attention_mass(q, k, mask, 0.5, 2)
    counts = torch.ops.tpc.below_mean_counts(q, k, mask, 0.5, 2)
    assert counts.shape == (2, 2, 2, 6)
    for b, h, j in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(6)).tolist():
        total, below = 0.0, [0, 0]
        for t in (1, 2):
            for g in (2 * h, 2 * h + 1):
                p = torch.softmax((q[b, g, t] @ k[b, h].T * 0.5).masked_fill(~mask[b, 0, t], float("-inf")), 0)
                total += p[j]
                below[t - 1] += int(bool(mask[b, 0, t, j]) and p[j] < 1 / int(mask[b, 0, t].sum()))
        torch.testing.assert_close(mass[b, h, j], total)
        assert counts[b, h, :, j].tolist() == below
    for op, args in [(torch.ops.tpc.attention_mass.default, (q, k, mask, 0.5, 2)),
                     (torch.ops.tpc.below_mean_counts.default, (q, k, mask, 0.5, 2))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compile_and_inspect_have_no_artifact_for_a_kv_cache(tmp_path, capsys):
    from tpc.cli import main

    for args in (["compile", str(tmp_path / "none"), "--pass", "h2o", "-o", str(tmp_path / "x.pt2")],
                 ["inspect", str(tmp_path / "none"), "--pass", "snapkv"]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "compresses the KV cache while generating" in err[0]
    assert not list(tmp_path.iterdir())


def test_passes_lists_the_kv_eviction_methods(capsys):
    from tpc.cli import main

    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for method in METHODS:
        line = next(i for i, text in enumerate(lines) if text.startswith(method + " "))
        assert "kv-eviction" in " ".join(lines[line:line + 4])
