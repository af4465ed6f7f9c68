"""A VLM compiled in one go: the prefill prunes visual tokens, the decode steps run a captured, rewritten
step of its language model (decode-time sparse attention: tidal, quest, dhsa; tpc/vlm/decode.py)."""

from __future__ import annotations

import types
from dataclasses import replace

import pytest
import torch

from decode_reference import tidal_step
from test_decode import _Recorder
from test_vlm_llava import prompt, tiny_llava
from tpc.errors import TpcError
from tpc.vlm import VlmModule, capture_decode_step, capture_prefill, compile_vlm, prune
from tpc.vlm.decode import decode_plan, decode_settings, rewrite

SAMPLING = {"do_sample": True, "top_k": 20, "temperature": 0.8}
NEW = 6


def llava_inputs():
    gen = torch.Generator().manual_seed(1)
    rows = [prompt(2, 5, 24, gen), prompt(1, 3, 24, gen)]
    return {"input_ids": torch.tensor([r[0] for r in rows]), "attention_mask": torch.tensor([r[1] for r in rows]),
            "pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}


def smolvlm_inputs():
    from test_vlm_smolvlm import IMAGE, PAD, VISUAL

    gen = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 60, (a,), generator=gen).tolist() + [IMAGE] * VISUAL
               + torch.randint(3, 60, (b,), generator=gen).tolist() for a, b in ((2, 5), (1, 3))]
    length = max(map(len, prompts))
    return {"input_ids": torch.tensor([[PAD] * (length - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts]),
            "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=gen)}


def qwen2vl_inputs():
    from test_vlm_qwen2vl import batch

    return batch([(2, 5), (1, 2)], torch.Generator().manual_seed(1))


def make(family):
    if family == "llava":
        return tiny_llava(), llava_inputs()
    if family == "smolvlm":
        from test_vlm_smolvlm import tiny_smolvlm
        return tiny_smolvlm(), smolvlm_inputs()
    from test_vlm_qwen2vl import tiny_qwen2vl
    return tiny_qwen2vl(), qwen2vl_inputs()


def vlm_maker():
    """vlms(family) -> (model, inputs, prefill program, decode-step program, the dense-decode module (divprune
    keep 0.5 before the language model), its greedy and sampled generations), made once per family and worker
    (tests/conftest.py's ``vlms``, shared with test_vlm_kvcache.py)."""
    made = {}

    def get(family):
        if family not in made:
            model, inputs = make(family)
            program, step = capture_prefill(model, inputs), capture_decode_step(model)
            dense = prune(model, program, inputs, method="divprune", keep=0.5)
            greedy = dense.generate(**inputs, max_new_tokens=NEW)
            torch.manual_seed(5)
            sampled = dense.generate(**inputs, max_new_tokens=NEW, **SAMPLING)
            made[family] = model, inputs, program, step, dense, greedy, sampled
        return made[family]

    return get


@pytest.fixture(scope="module")
def llava(vlms):
    """LLaVA's vlms("llava"), and its module with a tidal decode step (selection at layer 0) reading 1000 positions,
    then 3 (the pruned caches hold 16 and 13 real positions)."""
    return vlms("llava"), sparse(vlms, "llava", "tidal", [0], 1000), sparse(vlms, "llava", "tidal", [0], 3)


def sparse(vlms, family, method, layers=None, keep=1000, options=None):
    """The dense-decode module's pruned prefill (shared: rewritten once per family) with a sparse decode step;
    ``tpc.vlm.prune(…, decode=…)`` builds the same (test_tpc_compile_and_cli_write_prefill_and_sparse_step)."""
    model, inputs, program, step, dense, *_ = vlms(family)
    plan = decode_plan(model, dense.stages, decode_settings({"method": method, "layers": layers, "keep": keep,
                                                             "options": options}))
    out = VlmModule(dense.gm, model, dense.family, dense.stages, replace(dense.report), dense.example_inputs, program)
    out.attach_decoder(rewrite(model, plan, step))
    return out


def check_dense_tokens(pruned, inputs, greedy, sampled):
    assert pruned.decoder is not None and pruned.decoder.plan.sparse
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=NEW), greedy)
    torch.manual_seed(5)
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=NEW, **SAMPLING), sampled)


def test_a_tidal_budget_over_the_cache_generates_the_dense_decode_tokens(llava):
    """Prefill pruned, decode sparse with a budget >= the cache: the tokens of the VLM module's dense decode (the
    stock decoder layers over the same pruned cache), greedy and sampled."""
    (model, inputs, program, step, dense, greedy, sampled), pruned, _ = llava
    check_dense_tokens(pruned, inputs, greedy, sampled)


@pytest.mark.slow
@pytest.mark.parametrize("family, method, layers, options", [  # tidal on LLaVA: the fast test above
    ("smolvlm", "tidal", [0], None), ("qwen2vl", "tidal", [0], None), ("llava", "quest", None, {"page": 4}),
    ("qwen2vl", "dhsa", None, None)])
def test_every_method_and_family_over_the_cache_generates_the_dense_decode_tokens(vlms, family, method, layers,
                                                                                  options):
    _, inputs, *_, greedy, sampled = vlms(family)
    check_dense_tokens(sparse(vlms, family, method, layers, 1000, options), inputs, greedy, sampled)


def generates_each_example_alone(pruned, inputs):
    """The left-padded batch's new tokens are those each example generates alone, unpadded."""
    together = pruned.generate(**inputs, max_new_tokens=NEW)
    for b in range(2):
        real = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b:b + 1, real]
        alone = pruned.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                pixel_values=inputs["pixel_values"][b:b + 1], max_new_tokens=NEW)
        assert torch.equal(together[b, -NEW:], alone[0, -NEW:])


def test_a_left_padded_batch_generates_what_each_example_generates_alone(llava):
    generates_each_example_alone(llava[2], llava[0][1])


def test_the_sparse_layers_read_only_the_budget_of_the_pruned_cache(llava):
    """One step over the pruned prefill's cache: layer 0 selects 3 positions, layers 1 and 2 read those and the new
    token (4 keys, not the 17 of the cache); positions and logits those of the paper's step written as loops."""
    model, inputs, *_ = llava[0]
    pruned = llava[2]
    state = pruned.prefill(**inputs)
    length = state.valid[0].shape[1]
    token = state.logits[:, -1].argmax(-1)[:, None]
    position = state.positions.amax(-1, keepdim=True) + 1
    valid = torch.cat([state.valid[0], torch.ones(2, 1, dtype=torch.bool)], 1)
    past = [(layer.keys, layer.values) for layer in state.cache.layers]
    recorder = _Recorder(pruned.decoder.gm)
    with torch.no_grad():
        logits = recorder.run(token, position, valid.long(), [t for kv in past for t in kv])[0]
        lm = types.SimpleNamespace(model=model.model.language_model, config=model.config.text_config,
                                   lm_head=model.lm_head)
        expected, chosen = tidal_step(lm, token, position, valid, past, selection=[0], keep=3)
    assert recorder.keys_read == [length + 1, 4, 4]
    assert [c.tolist() for c in recorder.chosen] == [chosen[0]]
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decode, words", [
    ({"method": "divprune"}, "is not a decode-time method"),
    ({"method": "tidal", "budget": 8}, "decode has no key 'budget'"),
    ({"method": "tidal", "options": {"correct": 4}}, "drop option correct"),
    ({"method": "tidal", "layers": [7]}, "selection layer 7 is out of range"),
    ({"method": "quest", "keep": 0}, "give a budget of 1 or more"),
    (["tidal"], "decode is a decode-time method's settings"),
])
def test_bad_decode_settings_are_refused_in_one_line_before_capture(decode, words):
    with pytest.raises(TpcError, match=words) as err:
        compile_vlm(tiny_llava(), llava_inputs(), method="divprune", keep=0.5, decode=decode)
    assert "\n" not in str(err.value)


def test_pruning_inside_the_language_model_with_a_sparse_decode_is_refused():
    with pytest.raises(TpcError, match="after decoder layer 1 leaves the layers different lengths") as err:
        compile_vlm(tiny_llava(), llava_inputs(), method="fastv", layers=1, keep=0.5, decode="tidal")
    assert "\n" not in str(err.value)


def test_the_vlm_s_decode_step_alone_does_not_take_prompts(llava):
    inputs = llava[0][1]
    pruned = llava[1]
    with pytest.raises(TpcError, match="call generate\\(\\) of the VlmModule"):
        pruned.decoder.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=2)


def test_the_api_refuses_decode_where_it_does_not_apply():
    import tpc
    from test_decode import tiny

    with pytest.raises(TpcError, match="LlamaForCausalLM is not one: for a decoder language model give the "
                                       "decode-time method itself"):
        tpc.compile(tiny("llama"), method="divprune", decode={"method": "tidal"})
    with pytest.raises(TpcError, match="with decode \\(--decode\\), method \\(--pass\\) is the visual-token method"):
        tpc.compile("anything", method="tidal", decode={"method": "tidal"})
    with pytest.raises(TpcError, match="a recipe for encoders"):
        tpc.compile("anything", recipe=[{"layer": 0, "method": "tome", "r": 2}], decode="tidal")


def test_cli_decode_flags_need_decode_before_loading(cli, tmp_path):
    result = cli("inspect", str(tmp_path / "missing"), "--pass", "divprune", "--decode-keep", "8")
    assert result.returncode == 1
    assert "--decode-keep sets the decode-time sparse attention of --decode METHOD" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_tpc_compile_and_cli_write_prefill_and_sparse_step(tmp_path, capsys):
    """`tpc compile` on a LLaVA directory with --decode (the API's decode= runs in the tests above; `tpc inspect`
    with --decode prints the compile's report, tests/test_decode.py runs it for a decoder)."""
    from tpc.cli import main
    from tpc.pt2 import load_program

    model, _ = make("llava")
    directory, out = tmp_path / "llava", tmp_path / "vlm.pt2"
    model.save_pretrained(directory)
    capsys.readouterr()
    args = ["--pass", "divprune", "--keep", "0.5", "--decode", "tidal", "--decode-layers", "0", "--decode-keep", "3"]
    assert main(["compile", str(directory), *args, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tidal: selection layers [0], 2 sparse layers reading 3 positions" in text
    assert "    2  sparse            4" in text  # the table `tpc inspect` prints for the same arguments
    assert f"wrote {tmp_path / 'vlm.decode.pt2'}" in text
    step = load_program(tmp_path / "vlm.decode.pt2").module()
    assert any(n.target is torch.ops.tpc.top_positions.default for n in step.graph.nodes)
    assert main(["compile", str(directory), "--pass", "fastv", "--layers", "1", "--decode", "tidal", "-o",
                 str(tmp_path / "no.pt2")]) == 1
    assert "leaves the layers different lengths" in capsys.readouterr().err
    assert not (tmp_path / "no.pt2").exists() and not (tmp_path / "no.decode.pt2").exists()


def test_a_step_path_that_cannot_be_written_is_refused_before_the_prefill_replaces_a_file(llava, tmp_path, cli):
    """vlm.decode.pt2 a symlink into a missing directory: once the prefill was written over the user's vlm.pt2,
    then the step failed, and the failure removed vlm.pt2 (the user's file lost)."""
    pruned, out = llava[2], tmp_path / "vlm.pt2"
    out.write_text("the user's file")
    (tmp_path / "vlm.decode.pt2").symlink_to(tmp_path / "gone" / "step.pt2")
    with pytest.raises(TpcError, match="output directory .*gone' of -o does not exist") as err:
        pruned.save(out)
    assert "\n" not in str(err.value)
    assert out.read_text() == "the user's file"
    result = cli("compile", tmp_path / "missing", "--pass", "divprune", "--decode", "tidal", "-o", out)
    assert result.returncode == 1 and "gone' of -o does not exist" in result.stderr  # before loading the model
    assert out.read_text() == "the user's file"


@pytest.mark.slow
def test_a_step_write_interrupted_after_the_prefill_leaves_the_file_that_was_there(llava, tmp_path, monkeypatch):
    """Ctrl-C (or any failure) while the step is written, after the prefill was renamed over vlm.pt2: vlm.pt2 is
    the user's file again, and no temporary file is left."""
    pruned, out = llava[2], tmp_path / "vlm.pt2"
    out.write_text("the user's file")

    def interrupted(path, check=True):
        assert out.read_bytes()[:2] == b"PK"  # the new prefill (a zip archive) is in place
        raise KeyboardInterrupt

    monkeypatch.setattr(pruned.decoder, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pruned.save(out, check=False)
    assert out.read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm.pt2"]
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        pruned.save(out, check=False)
    assert list(tmp_path.iterdir()) == []
