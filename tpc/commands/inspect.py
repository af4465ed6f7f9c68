"""``tpc inspect``: attention sites, tokens per layer and FLOPs, before and after pruning."""

from __future__ import annotations

import tpc
from tpc import decode
from tpc.commands.arguments import compile_kwargs, describe_model
from tpc.compiled import recipe
from tpc.decode import DecodeReport


def run(args) -> int:
    kwargs = compile_kwargs(args)
    decode.refuse_kv_artifact(kwargs.get("method"), "inspect")
    if not getattr(args, "schedule_given", True):  # no schedule flag: the unpruned model, not --pass's default
        # (a VLM would otherwise be pruned with the default topk-cls, or refused for a tower without [CLS])
        kwargs.pop("method", None)
    report = tpc.inspect(args.model, **kwargs)
    if isinstance(report, DecodeReport):
        print(f"{describe_model(args)}: {report.summary()}")
        print(report.table())
        return 0
    print(f"{describe_model(args)}: {len(report.sites)} attention layers"
          + (f"; {recipe(report)}" if report.layers else ""))
    print(report.table())
    print(report.summary())
    return 0
