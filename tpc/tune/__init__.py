"""``tpc tune``: search recipes on the user's data (see docs/tune.md)."""

from tpc.tune.run import TuneResult, run_tune

__all__ = ["TuneResult", "run_tune"]
