"""Hostile and mistaken input, fourth round (issue 22's remainder): a causal LM given an encoder
method, NaN outputs blamed on the right party, early refusals, einsum attention spellings, and
what a fresh pass over the encoder, VLM and artifact paths found."""

from __future__ import annotations

import pytest
import torch

import tpc
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
        assert "use a decode-time method (--pass tidal) or a compressed KV cache (--pass streaming or h2o" in lines[0]
    with pytest.raises(TpcError, match="topk-mass prunes encoder tokens: for a decoder-only LM"):
        tpc.compile(tiny("llama", layers=2), (torch.randint(3, 96, (2, 8)),), method="topk-mass", layers=[0])
    assert not out.exists()
