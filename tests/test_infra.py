from __future__ import annotations

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


def test_pass_manager_reports_modified_and_names_the_failing_pass():
    assert PassManager([Noop(), Noop()])(object()).modified is False
    with pytest.raises(TpcError, match=r"pass broken failed, after noop: ValueError: boom"):
        PassManager([Noop(), Broken()])(object())
    with pytest.raises(TpcError, match=r"cannot do that \[in pass refuses, the first pass\]"):
        PassManager([Refuses(), Noop()])(object())
