from __future__ import annotations

import logging

import pytest

from tpc import TpcError
from tpc.passes import Pass, PassManager, PassResult


class Noop(Pass):
    name = "noop"

    def call(self, gm):
        return PassResult(gm, False)


class Broken(Pass):
    name = "broken"

    def call(self, gm):
        raise ValueError("boom")


class Refuses(Pass):
    name = "refuses"

    def call(self, gm):
        raise TpcError("cannot do that")


def test_pass_manager_reports_modified_and_names_the_failing_pass(caplog):
    assert PassManager([Noop(), Noop()])(object()).modified is False
    with pytest.raises(TpcError, match=r"^pass broken failed: ValueError: boom$"):
        PassManager([Noop(), Broken()])(object())
    with pytest.raises(TpcError, match=r"^cannot do that \[in pass refuses\]$"):
        PassManager([Refuses(), Noop()])(object())


def test_a_refusal_names_only_the_failing_pass_and_logs_the_passes_before_it(caplog):
    with caplog.at_level(logging.DEBUG, logger="tpc.passes"), pytest.raises(TpcError) as err:
        PassManager([Noop(), Noop(), Refuses()])(object())
    assert "noop" not in str(err.value)
    assert "pass refuses failed after noop, noop" in caplog.text
