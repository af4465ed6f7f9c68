"""Model coverage: each family compiles, keep=1.0 reproduces it, pruning runs in torch and ONNX
Runtime alike, and its rewritten graph is pinned in tests/golden/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

import tpc
from families import FAMILIES, MeanPooledEncoder, hf_bert, text_inputs
from lanes import first_fast
from specs import SELECTING
from tpc.exports.checks import run_graph
from tpc.graph.printing import format_rewrites
from tpc.passes import compactions


GOLDEN = Path(__file__).parent / "golden"


def leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.slow
@pytest.mark.parametrize("name", first_fast(FAMILIES))
def test_family_keep_one_prune_and_onnx(name, tmp_path, update_golden):
    factory, inputs, prefix = FAMILIES[name]
    model = factory()
    twin = tpc.compile(model, inputs(2), method="topk-cls", layers=[0, 1, 2], keep=1.0)
    x = inputs(3, seed=5)
    with torch.no_grad():
        for got, want in zip(leaves(twin(*x)), leaves(model(*x))):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pm = tpc.compile(model, inputs(2), method="topk-cls", layers=[0, 2], keep=[0.6, 0.5])
    assert pm.report.prefix == prefix
    assert pm.report.sites[1].tokens < pm.report.sites[0].tokens
    result = tpc.export(pm, tmp_path / "m.onnx")
    assert result.max_abs_error <= 1e-4
    text = format_rewrites(pm.graph_module)
    path = GOLDEN / f"family_{name}.txt"
    if update_golden:
        path.write_text(text)
    assert path.exists() and text == path.read_text(), f"{path.name} changed: review, then pytest --update-golden"


@pytest.mark.slow
@pytest.mark.parametrize("method", first_fast(SELECTING))
def test_bert_padding_never_outranks_real_tokens_and_mask_is_gathered(method):
    model = hf_bert()
    ids, mask = text_inputs(4, seed=3)
    pm = tpc.compile(model, text_inputs(2), method=method, layers=[0, 1], keep=[6, 4])
    _, replay = run_graph(pm.graph_module, (ids, mask))
    for b in range(4):
        real = set(range(int(mask[b].sum())))
        first = set(replay.decisions[0][b].tolist())
        assert first <= real or real <= first
    streams = {c.out for c in compactions(pm.graph_module)}
    sides = [n for n in pm.graph_module.graph.nodes if n.target is torch.ops.tpc.gather_tokens.default and n not in streams]
    assert sides, "the attention mask must be gathered with the kept tokens"
    assert pm.report.pruned_outputs == [0]  # last_hidden_state holds the kept tokens; the pooler stays right


@pytest.mark.slow
@pytest.mark.parametrize("method", first_fast(SELECTING))
def test_mask_aware_mean_pooling_stays_a_mean_over_kept_real_tokens(method):
    model = MeanPooledEncoder(hf_bert()).eval()
    ids, mask = text_inputs(3, seed=6)
    # zero-tprune's similarity stage needs a fixed length (text models are dynamic by default)
    fixed = {"seq_len": ids.shape[1]} if method == "zero-tprune" else {}
    twin = tpc.compile(model, text_inputs(2), method=method, layers=[0, 1], keep=1.0, **fixed)
    torch.testing.assert_close(twin(ids, mask), model(ids, mask), atol=1e-5, rtol=1e-5)
    pm = tpc.compile(model, text_inputs(2), method=method, layers=[1], keep=6, **fixed)
    gm = pm.graph_module
    _, replay = run_graph(gm, (ids, mask))
    kept = replay.decisions[0]
    assert pm(ids, mask).shape == (3, 32)
    for b in range(3):
        real = set(range(int(mask[b].sum())))
        assert set(kept[b].tolist()) <= real or real <= set(kept[b].tolist())


def test_hf_directory_saved_with_save_pretrained(tmp_path):
    from families import hf_vit

    hf_vit().save_pretrained(tmp_path / "vit")
    pm = tpc.compile(str(tmp_path / "vit"), layers=[1], keep=0.5)
    assert [s.tokens for s in pm.report.sites] == [17, 17, 9]
    with pytest.raises(tpc.TpcError, match="cannot load Hugging Face model 'nobody-xyz/no-such-model'"):
        tpc.compile("nobody-xyz/no-such-model", layers=[1])


@pytest.mark.slow
def test_hf_id_from_the_local_cache(tmp_path):
    """A Hugging Face id loads offline from the hub cache, as `huggingface_hub` lays it out."""
    import os
    import subprocess
    import sys

    from families import hf_vit

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-vit" / "snapshots" / ("0" * 40)
    hf_vit().save_pretrained(snapshot)
    (tmp_path / "hub" / "models--tiny-org--tiny-vit" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-vit" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "tpc", "inspect", "tiny-org/tiny-vit", "--layers", "1", "--keep", "0.5"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "17 -> 9" in r.stdout


@pytest.mark.slow
def test_tome_refuses_masked_attention_and_names_the_alternatives():
    with pytest.raises(tpc.TpcError, match="tome does not take attention masks yet.*kcenter, divprune or random"):
        tpc.compile(hf_bert(), text_inputs(2), method="tome", layers=[0], keep=10, seq_len=16)  # at a fixed length


@pytest.mark.slow
def test_a_model_compiled_from_a_tokenizer_dict_takes_keyword_calls():
    """`p = tpc.compile(BertModel, {"input_ids": …, "attention_mask": …}); p(**batch)`, as the model is called."""
    ids, mask = text_inputs()
    model = hf_bert().eval()
    pruned = tpc.compile(model, {"input_ids": ids, "attention_mask": mask}, method="topk-cls", layers=0, keep=1.0)
    want = pruned(ids, mask)
    for got in (pruned(input_ids=ids, attention_mask=mask), pruned(ids, attention_mask=mask)):
        assert all(torch.equal(g, w) for g, w in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)))
    with pytest.raises(tpc.TpcError, match="'token_type_ids' is not an input it was compiled with: this pruned model "
                                           "takes input_ids, attention_mask"):
        pruned(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(tpc.TpcError, match="missing input 'attention_mask'"):
        pruned(input_ids=ids)
