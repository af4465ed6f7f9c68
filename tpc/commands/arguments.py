"""The parsed command line as the keyword arguments of ``tpc.compile``, ``tpc.inspect`` and the
commands' ``run_*`` functions: what several commands share."""

from __future__ import annotations

from tpc.errors import TpcError
from tpc.models import parse_model_args


def options(args) -> dict | None:
    """--option KEY=VALUE (repeatable) and --fuse as the method's options."""
    out = _key_values(args.option, "--option")
    if args.fuse:
        out["fuse"] = True
    return out or None


def _key_values(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise TpcError(f"{flag} takes KEY=VALUE, not {item!r}")
        given = parse_model_args(item)
        twice = sorted(set(given) & set(out))
        if twice:
            raise TpcError(f"{flag} {twice[0]} is given twice ({out[twice[0]]!r}, then {given[twice[0]]!r}): give it once")
        out.update(given)
    return out


def vision_layer(text: str | None) -> int | list[int] | None:
    """--vision-layer I (one layer) or I,J,… (several, VTC-CLS's ensemble; "" names none, refused later)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    try:
        layers = [int(p) for p in parts]
    except ValueError:
        raise TpcError(f"--vision-layer {text!r}: give a vision layer number or several, comma-separated "
                       "(e.g. 10,11,12)") from None
    return layers[0] if len(layers) == 1 and "," not in text else layers


def decode_settings(args) -> dict | None:
    """--decode METHOD with --decode-layers, --decode-keep and --decode-option as ``tpc.compile``'s ``decode``."""
    method = getattr(args, "decode", None)
    extra = [flag for flag, given in (("--decode-layers", getattr(args, "decode_layers", None)),
                                      ("--decode-keep", getattr(args, "decode_keep", None)),
                                      ("--decode-option", getattr(args, "decode_option", None))) if given]
    if method is None:
        if extra:
            raise TpcError(f"{extra[0]} sets the decode-time sparse attention of --decode METHOD: give --decode too")
        return None
    return {"method": method, "layers": args.decode_layers, "keep": args.decode_keep,
            "options": _key_values(args.decode_option, "--decode-option") or None}


def load_kwargs(args) -> dict:
    return dict(weights=args.weights, random_weights=args.random_weights, model_args=args.model_args,
                input_size=args.input_size, weights_seed=args.weights_seed)


def prune_kwargs(args) -> dict:
    """The compile settings besides method, layers and keep."""
    decode = decode_settings(args)
    return dict(r=args.r, prefix=args.prefix, after=args.after, seed=args.seed, options=options(args),
                restore=args.restore, seq_len=args.seq_len, vision_layer=vision_layer(args.vision_layer),
                **({"decode": decode} if decode is not None else {}))


def compile_kwargs(args) -> dict:
    """Everything ``tpc.compile`` takes besides the model: a recipe, or the schedule flags."""
    if getattr(args, "recipe", None):
        if args.schedule_given:
            raise TpcError(f"--recipe replaces {', '.join(args.schedule_given)}: give the recipe or the flags, not both")
        decode = decode_settings(args)
        return dict(recipe=args.recipe, prefix=args.prefix, restore=args.restore, seq_len=args.seq_len,
                    **({"decode": decode} if decode is not None else {}), **load_kwargs(args))
    return {"method": args.method, "layers": args.layers, "keep": args.keep, **prune_kwargs(args), **load_kwargs(args)}


def describe_model(args) -> str:
    if args.random_weights:
        return f"{args.model} (random weights)"
    if args.weights:
        return f"{args.model} (weights {args.weights})"
    return args.model
