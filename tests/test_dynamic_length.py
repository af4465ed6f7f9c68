"""Text of any length: a text encoder compiled once serves every sequence length.

Tiny seeded BERTs (random weights) in torch, ONNX Runtime and .pt2: the kept count follows
ceil(ratio × n) per layer, padding never outranks a real token at any length and batch
composition, keep=1.0 is the identity at every length, and a token count is clamped to the length.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tpc
from families import MeanPooledEncoder
from lanes import first_fast
from models import sharpen
from reference import ratio_kept
from specs import SELECTING
from tpc.capture import length_range
from tpc.exports.checks import run_graph
from tpc.exports.onnx import check_onnx, to_onnx
from tpc.exports.tensorrt_compat import DYNAMIC_LENGTH, tensorrt_problems


MAX_LENGTH = 128


@functools.cache
def encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=MAX_LENGTH)
    return MeanPooledEncoder(sharpen(BertModel(config))).eval()


def batch(reals: list[int], length: int, seed: int = 0):
    """Token ids and mask [B, length]: example b has ``reals[b]`` real tokens, then padding (id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (len(reals), length), generator=g)
    mask = torch.zeros(len(reals), length, dtype=torch.int64)
    for b, real in enumerate(reals):
        mask[b, :real] = 1
        ids[b, real:] = 0
    return ids, mask


EXAMPLE = batch([16, 11], 16)


@functools.cache
def compiled(method: str, keep=0.5):
    return tpc.compile(encoder(), EXAMPLE, method=method, layers=[0, 1], keep=keep)


@pytest.mark.slow
@pytest.mark.parametrize("method", first_fast(SELECTING))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_length_and_padding_pattern_keeps_ceil_ratio_and_real_tokens_first(method, data):
    pm = compiled(method)
    length = data.draw(st.integers(2, 48), label="length")
    reals = data.draw(st.lists(st.integers(1, length), min_size=1, max_size=3), label="real tokens per example")
    ids, mask = batch(reals, length, seed=data.draw(st.integers(0, 99), label="seed"))
    out, replay = run_graph(pm.graph_module, (ids, mask))
    assert torch.isfinite(out[0]).all()
    counts = [length]
    for decision in replay.decisions:
        counts.append(1 + ratio_kept(0.5, counts[-1] - 1))
        assert decision.shape == (len(reals), counts[-1])
    first = replay.decisions[0]
    for b, real in enumerate(reals):
        kept, real_set = set(first[b].tolist()), set(range(real))
        assert kept <= real_set or real_set <= kept, f"padding outranked a real token: kept {sorted(kept)}, real {real}"


@pytest.mark.slow
def test_keep_one_is_the_identity_at_every_length():
    twin = compiled("topk-cls", 1.0)
    for length in (2, 3, 7, 16, 33, 64, 128):
        ids, mask = batch([length, max(1, length // 2), 1], length, seed=length)
        torch.testing.assert_close(twin(ids, mask), encoder()(ids, mask), atol=1e-5, rtol=1e-5)


def test_a_token_count_is_clamped_to_the_length_and_the_report_says_so():
    pm = compiled("topk-cls", 5)
    assert any("clamped" in note for note in pm.report.notes)
    assert any("dynamic" in note for note in pm.report.notes)
    short = batch([4, 3], 4)  # 3 non-prefix tokens < 5: everything is kept, the outputs are the unpruned ones
    torch.testing.assert_close(pm(*short), encoder()(*short), atol=1e-5, rtol=1e-5)
    _, replay = run_graph(pm.graph_module, batch([40, 40], 40))
    assert [tuple(d.shape) for d in replay.decisions] == [(2, 6), (2, 6)]


@pytest.mark.slow
def test_the_dynamic_graph_at_length_n_is_the_graph_compiled_for_n():
    dynamic = compiled("topk-cls")
    for length in (9, 24):
        fixed = tpc.compile(encoder(), EXAMPLE, method="topk-cls", layers=[0, 1], keep=0.5, seq_len=length)
        ids, mask = batch([length, length - 3, 2], length, seed=3)
        torch.testing.assert_close(dynamic(ids, mask), fixed(ids, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_seq_len_fixes_the_length_and_images_stay_fixed():
    fixed = tpc.compile(encoder(), EXAMPLE, method="topk-cls", layers=[1], keep=0.5, seq_len=24)
    assert length_range(fixed.graph_module) is None
    assert [s.tokens for s in fixed.report.sites] == [24, 24, 13]
    assert length_range(compiled("topk-cls").graph_module) == (2, MAX_LENGTH)
    from models import image_inputs, tiny_timm_vit as tiny_vit

    vit = tpc.compile(tiny_vit(), image_inputs(2), layers=[1], keep=0.5)
    assert length_range(vit.graph_module) is None
    with pytest.raises(tpc.TpcError, match="takes none: images keep the fixed size"):
        tpc.compile(tiny_vit(), image_inputs(2), layers=[1], keep=0.5, seq_len=24)


@pytest.mark.slow
def test_zero_tprune_by_default_runs_at_a_dynamic_length_and_its_s_stage_at_a_fixed_one():
    """similarity='auto': the paper's S-stage (0.5) where the length is fixed, importance alone where it is not."""
    def stages(pm):
        return sum(n.target is torch.ops.tpc.similarity_keep.default for n in pm.graph_module.graph.nodes)

    assert stages(tpc.compile(encoder(), EXAMPLE, method="zero-tprune", layers=[1], keep=0.5)) == 0
    assert stages(tpc.compile(encoder(), EXAMPLE, method="zero-tprune", layers=[1], keep=0.5, seq_len=16)) == 1


@pytest.mark.slow
def test_fixed_length_only_options_are_refused_clearly():
    with pytest.raises(tpc.TpcError, match="similarity stage.*needs a fixed sequence length.*--seq-len N"):
        tpc.compile(encoder(), EXAMPLE, method="zero-tprune", layers=[1], keep=0.5, options={"similarity": 0.5})
    with pytest.raises(tpc.TpcError, match="tome .its merge count. needs a fixed sequence length"):
        tpc.compile(encoder().encoder, EXAMPLE[:1], method="tome", layers=[1], keep=0.5)  # no mask: tome would run
    with pytest.raises(tpc.TpcError, match="--r removes a fixed number of tokens.*--seq-len N"):
        tpc.compile(encoder(), EXAMPLE, method="topk-cls", layers=[1], r=2)


@pytest.mark.slow
@pytest.mark.parametrize("method", first_fast(["topk-cls", "divprune"]))
def test_onnx_and_pt2_take_any_batch_and_length(method, tmp_path):
    pm = compiled(method)
    model = to_onnx(pm.graph_module, EXAMPLE)
    checks = [batch(reals, length, seed=length)
              for reals, length in (([7], 7), ([32, 10, 2], 32), ([MAX_LENGTH], MAX_LENGTH), ([MAX_LENGTH, 40, 3], MAX_LENGTH))]
    result = check_onnx(model, pm.graph_module, checks)
    assert result.max_abs_error <= 1e-4
    problems = tensorrt_problems(model)
    assert problems.count(DYNAMIC_LENGTH) == 1 and not any("computed at run time" in p for p in problems)
    if method == "topk-cls":
        tpc.export(pm, tmp_path / "m.pt2")
        loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
        for ids, mask in checks[:2]:
            torch.testing.assert_close(loaded(ids, mask), pm(ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_tensorrt_engine_refuses_a_dynamic_length_before_building(tmp_path):
    from tpc.exports.tensorrt import write_engine

    with pytest.raises(tpc.TpcError, match="TensorRT engine needs a fixed sequence length.*--seq-len N"):
        write_engine(compiled("topk-cls").graph_module, EXAMPLE, tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_check_names_its_half_length_run(tmp_path):
    """`tpc compile` says "checked … at batch 1 and 2, and batch 2 at 8 tokens", not "at batch 1 and 2 and 2"."""
    result = tpc.export(compiled("topk-cls"), tmp_path / "m.onnx")
    assert result.batches == (1, 2, 2) and result.where() == "at batch 1 and 2, and batch 2 at 8 tokens"


def test_the_module_refuses_the_lengths_its_pt2_refuses_in_one_line():
    """A length of 1 fails the .pt2's guard (torch.export specialises 0 and 1): the module says the same
    range in one line, instead of running a length no exported artifact was captured for."""
    pm = compiled("topk-cls")
    assert length_range(pm.graph_module) == (2, MAX_LENGTH)
    with pytest.raises(tpc.TpcError, match=r"takes 2-128 tokens .*not 1: pad the text to at least 2 tokens"):
        pm(*batch([1, 1], 1))
    assert pm(*batch([2, 1], 2)).shape == (2, 32)


@pytest.mark.slow
def test_seq_len_shorter_than_the_example_exports_to_onnx(tmp_path):
    """seq_len cut the example inputs as views; torch.export guarded on their base, which the ONNX
    exporter's decomposition cannot evaluate ('NoneType' object has no attribute 'size')."""
    fixed = tpc.compile(encoder(), batch([32, 32], 32), method="topk-cls", layers=[0], keep=0.5, seq_len=16)
    result = tpc.export(fixed, tmp_path / "m.onnx")
    assert result.max_abs_error <= 1e-4 and (tmp_path / "m.onnx").exists()
