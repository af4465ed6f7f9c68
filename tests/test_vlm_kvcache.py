"""A VLM compiled in one go with a compressed KV cache: the prefill prunes visual tokens and returns each decoder
layer's eviction scores (tpc/vlm/scores.py), the decode steps run the language model's scored step over a cache that
holds the budget (tpc/vlm/decode.py, tpc/decode/compressed.py)."""

from __future__ import annotations

import copy
import gc
import types
import weakref
from dataclasses import replace

import pytest
import torch

from kv_reference import run
from test_vlm_decode import NEW, SAMPLING, generates_each_example_alone, llava_inputs
from test_vlm_llava import tiny_llava
from tpc.errors import TpcError
from tpc.vlm import VlmModule, compile_vlm
from tpc.vlm.decode import compress, decode_settings
from tpc.vlm.family import language_model
from tpc.vlm.module import _decode_step, last_position

SMALL = {"streaming": {"sinks": 2}, "h2o": {"recent": 2}, "snapkv": {"window": 2, "kernel": 3},
         "scissorhands": {"recent": 2, "history": 3}}
BUDGET = 5  # the pruned LLaVA prompts hold 16 and 13 real positions


@pytest.fixture(scope="module")
def compressed(vlms):
    """compressed(family, method, keep) -> the dense-decode module's pruned prefill (a copy, rewritten to return
    scores) with a compressed KV cache; ``tpc.vlm.prune(…, decode=…)`` builds the same
    (test_tpc_compile_and_cli_take_a_compressed_cache)."""
    made = {}

    def get(family, method, keep):
        key = family, method, keep
        if key not in made:
            model, inputs, program, step, dense, *_ = vlms(family)
            out = VlmModule(copy.deepcopy(dense.gm), model, dense.family, dense.stages, replace(dense.report),
                            dense.example_inputs, program)
            settings = decode_settings({"method": method, "keep": keep, "options": SMALL[method]})
            out.attach_decoder(compress(model, out, settings, step))
            made[key] = out
        return made[key]

    return get


def kept(cache):
    """Per layer, per example, per KV head: the sequence indices kept (padding slots left out)."""
    return [[[[j for j in head if j >= 0] for head in example] for example in layer.positions.tolist()]
            for layer in cache.layers]


def decode(pruned, inputs, steps):
    """Greedy: (the cache's kept positions after the prefill and each step, the tokens, the cache)."""
    state = pruned.prefill(**inputs)
    logits, cache = pruned.compressed_cache(state)
    position, phases, tokens = last_position(state.positions), [kept(cache)], []
    for _ in range(steps):
        token = logits.argmax(-1)[:, None]
        tokens.append(token)
        position = position + 1
        logits = pruned.decoder.step(cache, token, position)
        phases.append(kept(cache))
    return phases, torch.cat(tokens + [logits.argmax(-1)[:, None]], 1), cache


@pytest.mark.parametrize("family", ["llava", *(pytest.param(f, marks=pytest.mark.slow)
                                                for f in ("smolvlm", "qwen2vl"))])
def test_a_budget_over_the_prompt_generates_the_dense_decode_tokens(vlms, compressed, family):
    """Prefill pruned, cache compressed (h2o) with a budget over prompt and new tokens: the tokens of the VLM module's
    dense decode (the stock decoder layers over the same pruned cache), greedy and sampled; Qwen2-VL's new tokens
    continue its M-RoPE positions. (The other rules, evicting: the paper's positions below.)"""
    _, inputs, *_, greedy, sampled = vlms(family)
    pruned = compressed(family, "h2o", 1000)
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=NEW), greedy)
    torch.manual_seed(5)
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=NEW, **SAMPLING), sampled)


@pytest.mark.parametrize("family", ["qwen2vl", *(pytest.param(f, marks=pytest.mark.slow) for f in ("llava", "smolvlm"))])
def test_each_step_s_logits_are_the_stock_layers_at_the_vlm_s_next_position(vlms, compressed, family):
    """With a budget over prompt and new tokens, each step's logits equal the stock decoder layers' over the dense
    pruned cache at the VLM's next position (Qwen2-VL: M-RoPE continued from the unpruned prompt). The tiny models
    barely react to rotary positions in their tokens; their logits move by about 1e-3 at a wrong position."""
    model, inputs, *_ = vlms(family)
    pruned = compressed(family, "h2o", 1000)
    logits, cache = pruned.compressed_cache(pruned.prefill(**inputs))
    state = pruned.prefill(**inputs)  # the same pruned prefill: its dense cache for the stock layers
    lm, head = language_model(model)
    position, valid = last_position(state.positions), state.valid
    for _ in range(4):
        token = logits.argmax(-1)[:, None]
        position = position + 1
        valid = [torch.cat([v, torch.ones_like(v[:, :1])], 1) for v in valid]
        with torch.no_grad():
            want = _decode_step(lm, head, token, position, valid, state.cache)
        logits = pruned.decoder.step(cache, token, position)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_generate_frees_the_prefill_s_cache_before_decoding(vlms, compressed, monkeypatch):
    """Between steps only the compressed cache is alive: the pruned prefill's own cache and logits are gone."""
    inputs = vlms("llava")[1]
    pruned = compressed("llava", "h2o", BUDGET)
    refs, alive = [], []
    prefill, step = pruned.prefill, pruned.decoder.step

    def watched_prefill(*args, **kwargs):
        state = prefill(*args, **kwargs)
        refs.extend(weakref.ref(t) for layer in state.cache.layers for t in (layer.keys, layer.values))
        refs.append(weakref.ref(state.logits))
        return state

    def counting_step(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))
        return step(*args, **kwargs)

    monkeypatch.setattr(pruned, "prefill", watched_prefill)
    monkeypatch.setattr(pruned.decoder, "step", counting_step)
    pruned.generate(**inputs, max_new_tokens=3)
    assert refs and alive == [0, 0]


def test_the_physical_cache_holds_the_budget_after_the_prefill_and_each_step(vlms, compressed):
    inputs = vlms("llava")[1]
    pruned = compressed("llava", "h2o", BUDGET)
    state = pruned.prefill(**inputs)
    length = state.valid[0].shape[1]
    _, cache = pruned.compressed_cache(state)
    token = torch.ones(2, 1, dtype=torch.long)
    for n in range(4):
        assert cache.get_seq_length() == length + n  # the logical length: every position seen
        for layer in cache.layers:
            assert tuple(layer.keys.shape) == tuple(layer.values.shape) == (2, 2, BUDGET, 8)  # not length + n
        pruned.decoder.step(cache, token, last_position(state.positions) + n + 1)


@pytest.mark.parametrize("method", ["h2o", *(pytest.param(m, marks=pytest.mark.slow)
                                            for m in ("snapkv", "scissorhands", "streaming"))])
def test_kept_positions_follow_the_paper_over_the_pruned_prompt(vlms, compressed, method):
    """LLaVA: the positions each layer and KV head keeps after the pruned prompt and each new token, and the tokens,
    those of the paper's rule written as loops (tests/kv_reference.py) over the pruned prompt's embeddings at their
    original positions."""
    model, inputs, *_ = vlms("llava")
    pruned = compressed("llava", method, BUDGET)
    phases, tokens, _ = decode(pruned, inputs, 3)
    state = pruned.prefill(**inputs)
    embedded = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embedded.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)  # the stock model: the prompt's embeddings, image features in place
    finally:
        hook.remove()  # the model is shared with other tests
    lm = types.SimpleNamespace(model=model.model.language_model, config=model.config.text_config,
                               lm_head=model.lm_head)
    for b in range(2):
        pad = int((~state.valid[0][b]).sum())
        index = state.kept[0][b, pad:]
        expected, generated = run(lm, None, method, BUDGET, SMALL[method], 3, first=pad,
                                  embeds=embedded[0][b, index], positions=state.positions[b, index].tolist())
        assert generated == tokens[b].tolist()
        assert [[layer[b] for layer in phase] for phase in phases] == expected


@pytest.mark.slow
def test_a_left_padded_batch_evicts_and_generates_as_each_example_alone(vlms, compressed):
    generates_each_example_alone(compressed("llava", "h2o", BUDGET), vlms("llava")[1])


@pytest.mark.parametrize("decode, layers, words", [
    ({"method": "h2o", "keep": 0}, None, "keep for a compressed KV cache is a budget of cached positions"),
    ({"method": "streaming", "keep": 4, "options": {"sinks": 4}}, None,
     "keep 4 is smaller than streaming's sinks of 4 plus a recent window of 1"),
    ({"method": "snapkv", "keep": 8}, None,
     "keep 8 is smaller than snapkv's window of 32: .*a smaller window \\(--decode-option window=…\\)$"),
    ({"method": "h2o", "layers": [0]}, None, "keeps its budget in every decoder layer: drop decode layers"),
    ({"method": "h2o", "options": {"sinks": 2}}, None, "h2o has no option 'sinks'; its options: recent"),
    ({"method": "h2o", "keep": 8}, 1, "a compressed KV cache takes one cache length for every decoder layer, and "
                                      "pruning visual tokens after decoder layer 1"),
])
def test_bad_compressed_cache_settings_are_refused_in_one_line_before_capture(decode, layers, words):
    method = "fastv" if layers is not None else "divprune"
    with pytest.raises(TpcError, match=words) as err:
        compile_vlm(tiny_llava(), llava_inputs(), method=method, layers=layers, keep=0.5, decode=decode)
    assert "\n" not in str(err.value)


def test_the_compressed_cache_has_no_file_and_its_decoder_takes_no_prompts(vlms, compressed, tmp_path, cli):
    inputs = vlms("llava")[1]
    pruned = compressed("llava", "h2o", BUDGET)
    with pytest.raises(TpcError, match="decode h2o compresses the KV cache while generating") as err:
        pruned.save(tmp_path / "vlm.pt2")
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []
    with pytest.raises(TpcError, match="call generate\\(\\) of the VlmModule"):
        pruned.decoder.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=2)
    result = cli("compile", tmp_path / "missing", "--pass", "divprune", "--decode", "h2o", "--decode-keep", "8",
                 "-o", tmp_path / "vlm.pt2")  # refused before the model loads
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "compresses the KV cache while generating" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_tpc_compile_and_cli_take_a_compressed_cache(vlms, tmp_path, capsys):
    """`tpc inspect --decode h2o` (``tpc.compile(…, decode=…)``'s report) and `tpc compile` on a LLaVA directory."""
    from tpc.cli import main

    model = vlms("llava")[0]
    directory = tmp_path / "llava"
    model.save_pretrained(directory)
    capsys.readouterr()
    assert main(["inspect", str(directory), "--pass", "divprune", "--keep", "0.5", "--decode", "h2o", "--decode-keep",
                 "8", "--decode-option", "recent=2"]) == 0
    assert "decode: LlavaForConditionalGeneration, KV cache compressed by h2o (recent 2): budget 8 positions in each " \
           "of the 3 layers" in capsys.readouterr().out
    out = tmp_path / "a.pt2"
    assert main(["compile", str(directory), "--pass", "divprune", "--decode", "h2o", "-o", str(out)]) == 1
    assert "compresses the KV cache while generating" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "a.decode.pt2").exists()


def test_bench_times_the_step_over_the_compressed_cache_and_counts_its_bytes(vlms, compressed):
    from tpc.vlm.bench import bench_vlm

    inputs = vlms("llava")[1]
    pruned = compressed("llava", "h2o", BUDGET)
    result = bench_vlm(pruned, inputs, "tiny llava", [2], threads=1, warmup=0, iters=1, repeats=1)
    row = result.rows[0]
    assert row.kv_bytes == (3 * 2 * 2 * 2 * 24 * 8 * 4, 3 * 2 * 2 * 2 * BUDGET * 8 * 4)  # layers, k and v, B, Hkv, d
    assert "KV cache compressed by h2o (recent 2): budget 5 positions" in result.config


def test_prefill_scores_adds_one_output_per_decoder_layer_and_leaves_a_rule_without_scores_alone(vlms, compressed):
    """The pass's no-match case (streaming ranks by position: the prefill as captured) and its match (h2o: after the
    logits, keys, values and kept positions, one [B, Hkv, S'] score per decoder layer, each a tpc::attention_mass)."""
    from tpc.vlm.scores import PrefillScores

    dense = vlms("llava")[4]
    gm = copy.deepcopy(dense.gm)
    code = gm.code
    assert PrefillScores(None, 1)(gm).modified is False and gm.code == code
    scored = compressed("llava", "h2o", BUDGET).gm
    outputs = scored.graph.output_node().args[0]
    assert len(outputs) == len(gm.graph.output_node().args[0]) + 3
    assert all(n.target is torch.ops.tpc.attention_mass.default for n in outputs[-3:])


@pytest.mark.parametrize("method", ["h2o", "tidal"])
def test_a_decode_time_method_given_as_a_vlm_s_method_names_decode(vlms, method):
    import tpc

    model, inputs, *_ = vlms("llava")
    with pytest.raises(TpcError, match=r"^LlavaForConditionalGeneration is a VLM: .*decode=\{'method': 'h2o'") as err:
        tpc.compile(model, inputs, method=method, keep=8)
    assert "\n" not in str(err.value)


def test_the_report_counts_the_prefill_s_eviction_scores(vlms, compressed):
    """h2o's prefill scores (one q·kᵀ per decoder layer over every prompt query) are counted as scoring
    multiply-adds: B·H·T·N·d per layer at batch 1, the pruned prompt's T = N tokens."""
    dense = vlms("llava")[4]
    pruned = compressed("llava", "h2o", BUDGET)
    report = pruned.report  # the compile's (copied) report, recounted after PrefillScores
    config = vlms("llava")[0].config.text_config
    heads, width = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    tokens = report.layer_tokens[0]
    expected = config.num_hidden_layers * heads * tokens * tokens * width
    assert report.flops_scoring - dense.report.flops_scoring == expected
    assert report.flops_after - dense.report.flops_after == expected
    assert "tokens per layer before eviction" in report.summary()


def test_a_ratio_too_small_for_a_prompt_is_refused_at_generate_with_the_vlm_s_flag(vlms, compressed):
    """keep=0.1 of the 16- and 13-token pruned prompts is 2 positions, under streaming's 2 sinks + 1."""
    inputs = vlms("llava")[1]
    with pytest.raises(TpcError, match=r"--decode-option") as err:
        compressed("llava", "streaming", 0.1).generate(**inputs, max_new_tokens=2)
    assert "\n" not in str(err.value) and "--option " not in str(err.value)
