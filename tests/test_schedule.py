from __future__ import annotations

import pytest

from tpc import TpcError
from tpc.schedule import kept_count, parse_keep, parse_kv_budget, parse_layers


def test_layers_parse_in_the_order_given():
    """The order is kept so a per-layer keep or r pairs with the layer it was written beside."""
    assert parse_layers("9, 3,6") == [9, 3, 6]
    assert parse_layers(4) == [4]
    assert parse_layers([2, 0]) == [2, 0]


@pytest.mark.parametrize("bad", ["a,b", "", [1, 1], [-1], [1.5], None])
def test_bad_layers(bad):
    with pytest.raises(TpcError):
        parse_layers(bad)


def test_keep_forms():
    assert parse_keep(0.7, 3) == [0.7, 0.7, 0.7]
    assert parse_keep("0.9,0.8,0.7", 3) == [0.9, 0.8, 0.7]
    assert parse_keep("120", 2) == [120, 120]
    assert parse_keep([0.5, 40], 2) == [0.5, 40]


@pytest.mark.parametrize("bad", [0.0, 1.01, -0.5, 0, -3, "x", True, [0.5]])
def test_bad_keep(bad):
    with pytest.raises(TpcError):
        parse_keep(bad, 2)


def test_kv_budget_forms():
    assert [parse_kv_budget(k, 1024, 256) for k in (None, "64", 64, "0.25", 0.25, "1e-1")] == [256, 64, 64, 0.25, 0.25, 0.1]


@pytest.mark.parametrize("bad,words", [("nan", "not 'nan'"), ("x", "not 'x'"), (float("nan"), "not nan"), (0, "not 0"),
                                       ("1.5", "not '1.5'"), (True, "not True"), (2048, "more than the 1024")])
def test_bad_kv_budget_is_named_as_given(bad, words):
    """--keep nan for a compressed KV cache was reported as 'not None'."""
    with pytest.raises(TpcError, match=words):
        parse_kv_budget(bad, 1024, 256)


def test_kept_count_rounds_up_like_evit():
    assert kept_count(0.7, 197, 1, 3) == 138  # ceil(0.7 * 196)
    assert kept_count(1.0, 197, 1, 3) == 196
    assert kept_count(0.001, 197, 1, 3) == 1
    assert kept_count(50, 197, 1, 3) == 50
    assert kept_count(0.55, 101, 1, 3) == 55  # exact: float's 0.55 * 100 is 55.00000000000001
    with pytest.raises(TpcError, match="cannot keep 197"):
        kept_count(197, 197, 1, 3)
