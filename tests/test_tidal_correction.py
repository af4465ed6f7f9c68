"""TidalDecode's cache correction (``--option correct=N``): every N new tokens one dense pass rewrites the
keys and values the sparse steps cached (tpc/decode/correction.py)."""

from __future__ import annotations

import pytest
import torch

from test_decode import prompts
from tpc.decode import compile_decoder
from tpc.decode.correction import corrected_step
from tpc.decode.module import KVBuffer
from tpc.errors import TpcError

pytest.importorskip("transformers")


def _dense_forward(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)


def test_correcting_every_token_generates_the_dense_tokens(decode_capture):
    model, program = decode_capture("llama")
    sparse = compile_decoder(model, layers=[1], keep=1, options={"correct": 1}, program=program)
    ids, mask = prompts()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(sparse.generate(ids, mask, max_new_tokens=6), expected)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20)
    torch.manual_seed(5)
    assert torch.equal(sparse.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=20), expected)


def test_a_corrected_cache_holds_the_dense_keys_and_values(decode_capture):
    model, program = decode_capture("llama")
    sparse = compile_decoder(model, layers=[1], keep=1, program=program)
    ids, mask = prompts()
    new = torch.tensor([[5, 9, 11], [7, 3, 40]])
    _, cache, positions = sparse.prefill(ids, mask)
    kv, position, step_mask = KVBuffer(cache, ids.shape[1] + 3), positions[:, -1:], mask
    for i in range(3):
        position, step_mask = position + 1, torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        if i < 2:
            kv.append(sparse.step(new[:, i:i + 1], position, step_mask, kv.views())[1:])
    dense = _dense_forward(model, torch.cat([ids, new], 1), step_mask)
    expected = [t for layer in dense.cache.layers for t in (layer.keys, layer.values)]
    sparse_keys = kv.views()[6][:, :, -2:]  # layer 3's keys of the two sparsely decoded tokens (layer 2 sparse)
    assert not torch.allclose(sparse_keys, expected[6][:, :, -3:-1], atol=1e-4)  # polluted before the correction
    logits = corrected_step(model, kv, new, position, step_mask)
    assert kv.length == ids.shape[1] + 3
    for got, want in zip(kv.views(), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, dense.logits[:, -1].float(), atol=1e-4, rtol=1e-4)


def test_each_correction_predicts_the_next_token_as_the_dense_model(decode_capture):
    """With corrections every 3 tokens, the 4th and 7th new tokens are the dense model's greedy choice
    after everything generated before them, whatever the sparse steps between chose."""
    model, program = decode_capture("llama")
    sparse = compile_decoder(model, layers=[1], keep=1, options={"correct": 3}, program=program)
    ids, mask = prompts()
    out = sparse.generate(ids, mask, max_new_tokens=7)
    for n in (4, 7):
        upto = out[:, :ids.shape[1] + n - 1]
        logits = _dense_forward(model, upto, torch.cat([mask, torch.ones(2, n - 1, dtype=mask.dtype)], 1)).logits
        assert torch.equal(logits[:, -1].argmax(-1), out[:, ids.shape[1] + n - 1])


@pytest.mark.parametrize("value", [-1, 1.5, True, "4"])
def test_a_bad_correction_interval_is_refused_in_one_line(decode_capture, value):
    model, program = decode_capture("llama")
    with pytest.raises(TpcError, match=r"option correct is a number of positions \(0 or more\), not"):
        compile_decoder(model, method="tidal", options={"correct": value}, program=program)


def test_correction_is_tidal_s_and_the_report_says_so(decode_capture):
    model, program = decode_capture("llama")
    with pytest.raises(TpcError, match="quest has no option 'correct'"):
        compile_decoder(model, method="quest", options={"correct": 4}, program=program)
    sparse = compile_decoder(model, layers=[1], keep=4, options={"correct": 16}, program=program)
    # the correction is generate()'s: the step that `tpc compile -o dec.pt2` writes does not correct anything
    assert "; generate() rewrites the cache of every 16 new tokens densely (not part of the saved step)" \
        in sparse.report.summary()
