"""Hostile and mistaken input, fourth round (issue 22's remainder): a causal LM given an encoder
method, NaN outputs blamed on the right party, early refusals, einsum attention spellings, and
what a fresh pass over the encoder, VLM and artifact paths found."""

from __future__ import annotations

import pytest
import torch

import tpc
from test_hardening import bad_files  # noqa: F401 (a fixture)
from tpc.errors import TpcError


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from test_decode import tiny

    directory = tmp_path_factory.mktemp("llama") / "llama"
    tiny("llama", layers=2).save_pretrained(directory)
    return directory


def test_an_encoder_method_on_a_causal_lm_is_refused_before_any_capture(cli, llama_dir, tmp_path):
    """torch.export's 'DynamicCache ... register a pytree' once reached the user; the registry's
    capabilities (no Where.DECODE) decide, for the CLI, bench, inspect and the API alike."""
    from test_decode import tiny

    out = tmp_path / "x.onnx"
    for args, method in [(["compile", llama_dir, "--pass", "topk-cls", "--layers", "0", "-o", out], "topk-cls"),
                         (["bench", llama_dir, "--pass", "tome", "--iters", "1", "--repeats", "1"], "tome"),
                         (["inspect", llama_dir], "without a decode-time method")]:
        result = cli(*args)
        lines = [line for line in result.stderr.splitlines() if "Loading weights" not in line]
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert "LlamaForCausalLM" in lines[0] and "is a decoder-only language model and " + method in lines[0]
        assert "use a decode-time method (--pass tidal or quest or dhsa) or a compressed KV cache (--pass streaming or h2o" \
            in lines[0]
    with pytest.raises(TpcError, match="topk-mass prunes encoder tokens: for a decoder-only LM"):
        tpc.compile(tiny("llama", layers=2), (torch.randint(3, 96, (2, 8)),), method="topk-mass", layers=[0])
    assert not out.exists()


class TokenVariance(torch.nn.Module):
    """Features' variance over the tokens: finite on the model's tokens, NaN on one kept token."""

    def __init__(self):
        super().__init__()
        from models import tiny_timm_vit

        self.vit = tiny_timm_vit(depth=2)

    def forward(self, x):
        return self.vit.forward_features(x).var(dim=1)


@pytest.mark.slow
@pytest.mark.fresh_capture  # the pruned module shares the model's weights, as a user's does
def test_nan_outputs_are_blamed_on_tpc_when_the_unpruned_model_is_finite():
    """The artifact check once said 'look for NaN or inf in its weights' whoever made them: the
    unpruned model run on the same inputs decides (here the artifact run is the pruned module's)."""
    from models import image_inputs
    from tpc.errors import TpcInternalError
    from tpc.exports.checks import check_artifact, flat_outputs

    model = TokenVariance().eval()
    pruned = tpc.compile(model, image_inputs(2), method="topk-mass", layers=[0], keep=1, prefix=0)

    def check():
        check_artifact(pruned.graph_module, lambda x: (flat_outputs(pruned(*x)), None), [image_inputs(2)], "the check")

    with pytest.raises(TpcInternalError, match="NaN or inf on the example inputs where the unpruned model's are "
                                               "finite, so tpc's pruning made them"):
        check()
    with torch.no_grad():
        model.vit.norm.bias[0] = float("nan")  # shared with the pruned module
    with pytest.raises(TpcError, match="outputs are NaN or inf on the example inputs even unpruned"):
        check()


def test_no_layers_is_said_before_loading_a_hub_id_or_calling_a_function(cli, tmp_path, monkeypatch):
    """A hub id was loaded (weights fetched) and a module:function called before 'pass --layers':
    now a hub id's cached config.json alone is read, and a method that cannot prune a VLM's visual
    tokens before its language model needs no look at the model at all."""
    import json

    import huggingface_hub.constants

    from families import hf_bert

    snapshot = tmp_path / "hub" / "models--someone--bert" / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    hf_bert().config.to_json_file(snapshot / "config.json")  # the config only: loading it would fail
    (tmp_path / "hub" / "models--someone--bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--bert" / "refs" / "main").write_text("0123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    marker = tmp_path / "called"
    (tmp_path / "builds.py").write_text(f"def model():\n    open({str(marker)!r}, 'w').close()\n")
    out = tmp_path / "m.onnx"
    for args in (["someone/bert"], ["builds:model", "--pass", "topk-mass"], ["builds:model", "--pass", "zero-tprune"]):
        result = cli("compile", *args, "-o", out, cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [
            "tpc: error: no pruning layers given: pass --layers, e.g. --layers 3,6,9"], result.stderr
    assert not marker.exists() and not out.exists()
    assert json.loads((snapshot / "config.json").read_text())["model_type"] == "bert"


class SpelledAttention(torch.nn.Module):
    """One attention block; ``scores``/``mix`` are einsum equations (None: matmuls); ``layout`` is
    how q, k, v are held: [B, H, N, d] ("bhnd"), [B, N, H, d] ("bnhd"), or with kᵀ given ("kt")."""

    def __init__(self, scores=None, mix=None, layout="bhnd", dim=16, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads
        self.scores, self.mix, self.layout = scores, mix, layout

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.scores is None:
            out = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1) @ v
            return x + self.proj(out.transpose(1, 2).reshape(b, n, c))
        if self.layout == "bnhd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        operands = {"bhnd": (q, k), "bnhd": (q, k), "kt": (q, k.transpose(-2, -1)), "swap": (k, q),
                    "per-head scale": (q, k, torch.ones(self.heads))}[self.layout]
        probs = (torch.einsum(self.scores, *operands) * (c // self.heads) ** -0.5).softmax(-1)
        out = torch.einsum(self.mix, probs, v)
        return x + self.proj((out if self.layout == "bnhd" else out.transpose(1, 2)).reshape(b, n, c))


SPELLINGS = [("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", "bhnd"), ("...qd,...kd->...qk", "...qk,...kd->...qd", "bhnd"),
             ("bhid,bhjd->bhij", "bhij,bhjd->bhid", "bhnd"), ("bhqd,bhdk->bhqk", "bhqk,bhkd->bhqd", "kt"),
             ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", "bnhd"), ("bhkd,bhqd->bhqk", "zyxw,zywv->zyxv", "swap"),
             ("b h q d, b h k d -> b h q k", "b h q k, b h k d -> b h q d", "bhnd")]


class SpelledEncoder(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = torch.nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1))[:, 0]


@pytest.mark.slow
def test_every_spelling_of_einsum_attention_prunes_as_its_matmuls_do():
    """Only 'bhqd,bhkd->bhqk'-like equations were read: '...', [B, N, H, d] layouts, a given kᵀ,
    operands swapped gave 'no attention layers found'. Each block here spells it another way; the
    pruned model equals the same weights written with matmuls, pruned alike."""
    torch.manual_seed(0)
    spelled = SpelledEncoder([SpelledAttention(*s) for s in SPELLINGS]).eval()
    plain = SpelledEncoder([SpelledAttention() for _ in SPELLINGS]).eval()
    plain.load_state_dict(spelled.state_dict())
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(spelled(x), plain(x), atol=1e-5, rtol=1e-5)
    settings = dict(method="topk-mass", layers=[0, 2, 4], keep=0.7)
    pruned, reference = tpc.compile(spelled, (x[:2],), **settings), tpc.compile(plain, (x[:2],), **settings)
    assert [s.tokens for s in pruned.report.sites] == [s.tokens for s in reference.report.sites] == [17, 13, 13, 10, 10, 8, 8]
    torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_an_einsum_attention_tpc_cannot_read_is_named_never_pruned_silently():
    x = torch.randn(2, 16, 16)
    odd = ("bhqd,bhkd,h->bhqk", "bhqk,bhkd->bhqd", "per-head scale")
    with pytest.raises(TpcError, match=r"no attention layers found .* einsum 'bhqd,bhkd,h->bhqk' \(node 'einsum' "
                                       r"\(aten.einsum\) in blocks.0\) is not one matrix product"):
        tpc.compile(SpelledEncoder([SpelledAttention(*odd)]).eval(), (x,), layers=[0])
    with pytest.raises(TpcError, match=r"cannot prune after layer 0: node 'einsum\w*' \(aten.einsum\) in blocks.1: "
                                       "reads the tokens and tpc has no token-axis rule"):
        tpc.compile(SpelledEncoder([SpelledAttention(*SPELLINGS[0]), SpelledAttention(*odd)]).eval(), (x,), layers=[0])


def test_a_pruned_module_says_which_input_is_of_another_dtype_count_or_shape(compiled):
    """Hostile pass: pm(x.half()), pm(torch.randn(2, 3, 16, 16)), pm(x, x) and a bool BERT mask gave
    torch's 'Input type (c10::Half) and bias type (float)', 'Guard failed: x.size()[2] == 32', a
    pytree ValueError and 'Tensor dtype mismatch'."""
    pm = compiled("timm_vit", "topk-cls")
    x = torch.randn(3, 3, 32, 32)
    for args, words in [((x.half(),), "input x is float16 [3, 3, 32, 32]; this pruned model takes float32 "
                                      "[*, 3, 32, 32]: cast it (.to(torch.float32))"),
                        ((x.double(),), "input x is float64"), ((x.long(),), "input x is int64"),
                        ((torch.randn(2, 3, 16, 16),), "input x is float32 [2, 3, 16, 16]; this pruned model takes "
                                                       "float32 [*, 3, 32, 32]: give it that shape"),
                        ((x[0],), "float32 [3, 32, 32]; this pruned model takes float32 [*, 3, 32, 32]"),
                        ((x, x), "this pruned model takes 1 input(s) (x), not 2")]:
        with pytest.raises(TpcError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                           .replace("*", r"\*").replace(".", r"\.")):
            pm(*args)
    for batch in (0, 1, 17):  # any batch still runs
        assert pm(torch.randn(batch, 3, 32, 32)).shape == (batch, 5)


def test_output_places_and_flags_that_cannot_apply_are_refused_before_any_work(cli, tmp_path):
    """Hostile pass: -o under /proc compiled, then said 'no space left ... 0 are free'; --precision
    and --batch with -o x.pt2 were ignored; --input-size 3,-1,32 and --std 0 (images divided by 0)
    reached torch or ran; an empty .onnx became a Triton repository with no inputs or outputs."""
    import os

    import numpy as np

    empty, data = tmp_path / "empty.onnx", tmp_path / "data.npz"
    empty.write_bytes(b"")
    np.savez(data, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.int64))
    cases = [(["compile", "no-such-model", "--layers", "1", "--precision", "fp16", "-o", tmp_path / "a.pt2"],
              "--batch and --precision (batch=, precision=) set a TensorRT engine's"),
             (["compile", "no-such-model", "--layers", "1", "--batch", "1,2,4", "-o", tmp_path / "a.onnx"],
              "they do not apply to .onnx"),
             (["compile", "vit_tiny_patch16_224", "--random-weights", "--input-size", "3,-1,32", "--layers", "1", "-o",
               tmp_path / "a.pt2"], "--input-size '3,-1,32': every size is 1 or more"),
             (["eval", "no-such-model", "--data", data, "--mean", "0.5", "--std", "0.5,0,0.5"],
              "--std 0.5,0,0.5: every value is a finite number above 0"),
             (["eval", "no-such-model", "--data", data, "--mean", "nan", "--std", "0.5"],
              "--mean nan: every value is a finite number"),
             (["export", empty, "--triton-repo", tmp_path / "repo"], "holds no graph with inputs and outputs, it is empty")]
    if os.path.isdir("/proc") and os.statvfs("/proc").f_blocks == 0:
        cases.append((["compile", "no-such-model", "--layers", "1", "-o", "/proc/a.pt2"],
                      "output directory '/proc' of -o is on a virtual filesystem"))
    for args, words in cases:
        result = cli(*args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and words in result.stderr, (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "empty.onnx"]


@pytest.mark.slow
def test_bench_refuses_settings_a_decoder_method_does_not_take_before_loading(cli, tmp_path):
    """Hostile pass: tpc bench --pass streaming --layers 0 (or --r, --seq-len) and --pass tidal --r 2
    were measured with those flags silently dropped; tpc bench now compiles through tpc.compile,
    which refuses them as tpc compile does, before the model loads."""
    model = tmp_path / "none"  # never loaded
    for args, words in [(["--pass", "streaming", "--keep", "8", "--layers", "0"], "streaming (a compressed KV cache) "
                                                                                   "takes method, keep and options only"),
                        (["--pass", "h2o", "--keep", "8", "--r", "2"], "takes method, keep and options only"),
                        (["--pass", "snapkv", "--keep", "64", "--seq-len", "8"], "takes method, keep and options only"),
                        (["--pass", "tidal", "--layers", "0", "--keep", "4", "--r", "2"],
                         "tidal (decode-time sparse attention) takes method, layers, keep and options only"),
                        (["--pass", "tidal", "--layers", "0", "--keep", "4", "--option", "a=1"],
                         "tidal has no option 'a'; its options: correct (default 0)")]:
        result = cli("bench", model, *args, "--context", "16")
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and words in result.stderr, (args, result.stderr)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_bench_of_a_compressed_kv_cache_runs_from_the_cli(cli, llama_dir):
    result = cli("bench", llama_dir, "--pass", "h2o", "--keep", "8", "--context", "16", "--batch", "1", "--warmup", "0",
                 "--iters", "1", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "budget 8 positions in each of the 2 layers" in result.stdout


@pytest.mark.slow
def test_a_program_tpc_pruned_is_refused_by_every_command_that_would_prune_it_again(cli, compiled, bad_files, tmp_path):
    """Hostile pass: tune and visualize of a .pt2 tpc wrote said 'no normalisation' or 'does not take
    images', bench 'GraphModule was already pruned'; eval without --layers still evaluates it as it is."""
    pruned = tmp_path / "p.pt2"
    tpc.export(compiled("timm_vit", "topk-cls"), pruned, check=False)
    data, norm = bad_files / "u8.npz", ["--mean", "0.5", "--std", "0.5"]
    for args in (["tune", pruned, "--data", data, *norm, "--max-drop", "1", "-o", tmp_path / "r.json"],
                 ["visualize", pruned, data, "-o", tmp_path / "v.png", "--layers", "0"],
                 ["bench", pruned, "--layers", "0"],
                 ["eval", pruned, "--data", data, *norm, "--layers", "0"]):
        result = cli(*args)
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [
            "tpc: error: p.pt2 was already pruned by tpc: compile the original model with the combined schedule "
            "(--layers/--keep over all layers) instead"], (args, result.stderr)
    assert cli("eval", pruned, "--data", data, *norm).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt2"]
