"""The ``tpc`` command line: compile, passes, inspect, tune, export, serve (and the measuring commands).

This module parses the arguments only; each command's work is ``run(args)`` in its module under
:mod:`tpc.commands`, imported through ``COMMANDS`` once the arguments parse (the table pip keeps
for its commands), so ``tpc --help`` and an argument error load no command's module (they still
run ``tpc/__init__.py``, which imports torch and the API).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
import threading

from tpc import signals
from tpc.registry import DEFAULT_METHOD
from tpc.errors import REPORT, TpcError, TpcInternalError
from tpc.signals import Terminated

COMMANDS = {  # command -> the module whose run(args) does its work, imported only for that command
    "compile": "tpc.commands.compile",
    "passes": "tpc.commands.passes",
    "inspect": "tpc.commands.inspect",
    "bench": "tpc.commands.bench",
    "visualize": "tpc.commands.visualize",
    "tune": "tpc.commands.tune",
    "eval": "tpc.commands.eval",
    "export": "tpc.commands.export",
    "serve": "tpc.commands.serve",
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm name, path/to/model.pt2, or package.module:function")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="state_dict or .safetensors file to load into the model")
    w.add_argument("--random-weights", action="store_true", help="architecture only: no pretrained weights")
    p.add_argument("--weights-seed", type=int, help="the seed --random-weights are drawn with (timm and Hugging Face "
                                                    "alike); default 0")
    p.add_argument("--model-args", help="constructor arguments, e.g. img_size=32,patch_size=4,num_classes=10")
    p.add_argument("--input-size", help="input shape without batch, e.g. 3,224,224 (default: from the model)")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pass", dest="method", help="pruning method (see `tpc passes`); default topk-cls")
    p.add_argument("--layers", help="layers after which to prune, 0-based, e.g. 3,6,9 (tome: every layer by default)")
    p.add_argument("--keep", help="ratio kept per layer (default 0.7), one per layer (0.9,0.8,0.7), or token counts (120)")
    p.add_argument("--prefix", type=int, help="number of prefix tokens always kept (default: found in the graph)")
    p.add_argument("--after", choices=("attention", "block"),
                   help="prune after the attention residual (default; the MLP runs on fewer tokens) or after the block")
    p.add_argument("--seed", type=int, help="seed of the random method; default 0 (--weights-seed draws --random-weights)")
    p.add_argument("--r", help="tokens removed per layer instead of --keep, as ToMe takes r: 16, one per layer 16,8,4, "
                               "or ToMe's schedule '(16,-0.5)' (r, inflection); tome clamps it per layer as ToMe does")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --option iterations=10 (see `tpc passes`); repeatable")
    p.add_argument("--fuse", action="store_true", help="topk-cls: append EViT's fused token (same as --option fuse=True)")
    p.add_argument("--restore", action="store_true",
                   help="bring the full sequence back after the last block (dropped tokens unchanged), for dense outputs")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help="text models: fix the sequence length at N (default: dynamic, one artifact for every length)")
    p.add_argument("--vision-layer", metavar="I[,J,...]",
                   help="VLMs, --pass topk-cls: the vision layer whose attention scores the visual tokens ([CLS] "
                        "attention, VTC-CLS; attention received where the tower has no [CLS]), or several whose "
                        "scores are summed (VTC-CLS's ensemble), e.g. 10,11,12 (default: the feature layer)")
    p.add_argument("--decode", metavar="METHOD",
                   help="VLMs: decode-time sparse attention in the decode steps (tidal, quest, dhsa), or a compressed "
                        "KV cache (h2o, snapkv, scissorhands, streaming), beside --pass's visual-token pruning of the "
                        "prefill (docs/vlm.md)")
    p.add_argument("--decode-layers", metavar="LAYERS",
                   help="with --decode: tidal's selection layers, or quest's and dhsa's sparse layers (e.g. 2,15)")
    p.add_argument("--decode-keep", metavar="N",
                   help="with --decode: cached positions the sparse layers read, or a compressed cache keeps per "
                        "layer (default 256), or a ratio in (0, 1]")
    p.add_argument("--decode-option", action="append", default=[], metavar="KEY=VALUE",
                   help="with --decode: an option of the decode-time method, e.g. page=16; repeatable")


PRUNE_DEFAULTS = {"method": DEFAULT_METHOD}  # keep: None means 0.7 (tpc.compile)
SCHEDULE_FLAGS = {"method": "--pass", "layers": "--layers", "keep": "--keep", "r": "--r", "option": "--option",
                  "fuse": "--fuse", "vision_layer": "--vision-layer", "after": "--after", "seed": "--seed"}


def _fill_prune_defaults(args) -> None:
    """Note which schedule flags were given (a recipe replaces them), then fill the defaults."""
    args.schedule_given = [flag for key, flag in SCHEDULE_FLAGS.items()
                           if getattr(args, key, None) not in (None, [], "") and getattr(args, key) is not False]
    for key, value in PRUNE_DEFAULTS.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpc", description="tpc: token pruning compiler for transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what every pass changed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="prune a model and write an artifact (.onnx, .pt2, .plan)")
    _add_model_args(p)
    _add_prune_args(p)
    p.add_argument("--recipe", help="recipe.json (as `tpc tune` writes it): a method, layer and keep or r per step, "
                   "instead of --pass/--layers/--keep/--r/--option")
    p.add_argument("-o", "--output", required=True, help="artifact path; the suffix picks the format")
    p.add_argument("--no-check", action="store_true", help="skip checking the artifact against the torch module")
    p.add_argument("--batch", help="TensorRT engines: the optimization profile's batch sizes min,opt,max (default 1,2,32)")
    p.add_argument("--precision", default="fp32", help="TensorRT engines: fp32 (default), fp16 or bf16")

    p = sub.add_parser("passes", help="list the pruning methods and their papers")

    p = sub.add_parser("inspect", help="attention sites, tokens per layer and FLOPs, before/after pruning")
    _add_model_args(p)
    _add_prune_args(p)
    p.add_argument("--recipe", help="recipe.json: describe the model as this recipe prunes it")

    p = sub.add_parser("bench", help="latency of the pruned and the unpruned model, side by side")
    _add_model_args(p)
    _add_prune_args(p)
    p.add_argument("--backend", help="onnxruntime (default), torch, or tensorrt; a VLM: torch (the default)")
    p.add_argument("--batch", default="1,8", help="batch sizes, e.g. 1,8,32")
    p.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each model first")
    p.add_argument("--iters", type=int, default=10, help="timed runs per model per repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (their spread shows the noise)")
    p.add_argument("--context", default="2048", help="decoders: cached positions (tidal, quest, dhsa) or prompt length (KV-eviction methods), e.g. 2048,8192")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = sub.add_parser("visualize", help="draw which patches each pruning layer keeps")
    _add_model_args(p)
    p.add_argument("image", help="an image file (resized and centre-cropped to the model's input)")
    _add_prune_args(p)
    p.add_argument("--mean", help="normalisation mean (default: the model's config)")
    p.add_argument("--std", help="normalisation std (default: the model's config)")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")

    p = sub.add_parser("tune", help="search the fastest recipe within an accuracy budget on your data; writes recipe.json")
    _add_model_args(p)
    p.add_argument("--data", required=True, help=".npz with images (+ labels) or with one array per model input, "
                   "or an ImageFolder directory")
    p.add_argument("--max-drop", type=float, help="largest metric drop allowed: points of top-1/agreement, or 1 - cosine")
    p.add_argument("--max-flops", type=float, help="instead: the best metric with at most this FLOPs ratio (e.g. 0.6)")
    p.add_argument("--confidence", type=float, default=0.9,
                   help="the pick's drop is within --max-drop with this confidence (a fixed-sequence test down the "
                   "recipes by FLOPs, or by latency with --target latency; default 0.9; lower picks more aggressive "
                   "recipes on small data)")
    p.add_argument("--metric", help="top1 (labels), agreement or cosine (default: from the data and the model's output)")
    p.add_argument("--target", default="flops", help="flops (default) or latency (measured on --backend at --batch)")
    p.add_argument("--backend", help="with --target latency: the backend timed, onnxruntime (the default)")
    p.add_argument("--batch", type=int, help="with --target latency: the batch size timed (default 8)")
    p.add_argument("--time", default="15m", help="search time budget, e.g. 15m, 90s (default 15m)")
    p.add_argument("--check-split", type=float, default=0.2,
                   help="held-out fraction at the end of the data, reported next to the tuning part (default 0.2)")
    p.add_argument("--methods", help="methods to search, e.g. tome,topk-cls (default: all but random)")
    p.add_argument("--after", choices=("attention", "block"), default="attention", help="insertion point (default attention)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("--mean", help="image normalisation mean (default: the model's config)")
    p.add_argument("--std", help="image normalisation std (default: the model's config)")
    p.add_argument("--plot", help="PNG of the Pareto front with every method's recipes and the unpruned model")
    p.add_argument("--progress", action="store_true", default=None, help="show progress even when not on a terminal")
    p.add_argument("-o", "--output", required=True, help="the recipe.json to write (read by tpc compile --recipe)")

    p = sub.add_parser("eval", help="top-1 and agreement with the unpruned model on labelled images")
    _add_model_args(p)
    _add_prune_args(p)
    p.add_argument("--data", required=True, help=".npz with images (uint8) and labels, or an ImageFolder directory")
    p.add_argument("--sweep", help="evaluate several budgets in one run, e.g. keep=0.9,0.8,0.7")
    p.add_argument("--mean", help="normalisation mean, e.g. 0.485,0.456,0.406 (default: the model's config)")
    p.add_argument("--std", help="normalisation std (default: the model's config)")
    p.add_argument("--backend", default="torch", help="torch (default) or onnxruntime")
    p.add_argument("--batch", type=int, default=500, help="images per forward pass")
    p.add_argument("--offset", type=int, default=0, help="skip the first N images")
    p.add_argument("--limit", type=int, help="evaluate at most N images")
    p.add_argument("--plot", help="PNG of accuracy against FLOPs (default with --sweep: <model>_sweep.png)")
    p.add_argument("--progress", action="store_true", default=None, help="show a progress bar even when not on a terminal")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = sub.add_parser("export", help="write a Triton Inference Server model repository for an ONNX artifact")
    p.add_argument("artifact", help="the .onnx artifact (as tpc compile writes it)")
    p.add_argument("--triton-repo", required=True, metavar="DIR", help="the model repository folder (created if new)")
    p.add_argument("--name", help="the model's name in the repository (default: the artifact's file name)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch the dynamic batcher forms (default 32)")
    p.add_argument("--backend", choices=("onnxruntime", "python"), default="onnxruntime",
                   help="onnxruntime (default: a full Triton installation or container) or python (ONNX Runtime in "
                   "Triton's Python backend, as tpc serve runs it)")

    p = sub.add_parser("serve", help="serve an ONNX artifact on the Triton server bundled by nvidia-pytriton")
    p.add_argument("artifact", help="the .onnx artifact (as tpc compile writes it)")
    p.add_argument("--name", help="the model's name in the URLs (default: the artifact's file name)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch the dynamic batcher forms (default 32)")
    parser.command_parsers = sub.choices  # command -> its parser, which reports its own unknown flags
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments; a flag no parser takes is reported by the parser of the command it follows (with
    that command's usage, as a missing argument is), not by tpc's."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        after_command = args.command in argv and argv.index(unknown[0]) > argv.index(args.command)
        (parser.command_parsers[args.command] if after_command else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command; SIGTERM, like Ctrl-C, unwinds so partial files are removed (both remembered:
    ``tpc.signals``)."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    signals.clear()
    previous = {s: signal.signal(s, signals.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(argv)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signals.clear()


def _drop_unwritable_stdout() -> None:
    """Point standard output at /dev/null when what is left in its buffer cannot be written, so the
    flush at exit does not fail a second time with a traceback."""
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    _fill_prune_defaults(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        try:
            return importlib.import_module(COMMANDS[args.command]).run(args)
        except Exception:
            signals.raise_if_signalled()  # Ctrl-C or SIGTERM that torch turned into another error
            raise
    except TpcError as err:
        if args.debug:
            raise
        print(f"tpc: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tpc: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("tpc: terminated; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # the reader of the output went away (`tpc passes | head -1`): nothing to say
        _drop_unwritable_stdout()
        return 128 + signal.SIGPIPE
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or args.debug:
            raise
        _drop_unwritable_stdout()
        print(f"tpc: error: {err.strerror}{f': {err.filename}' if err.filename else ''}; free some space and rerun",
              file=sys.stderr)
        return 1
    except Exception as err:  # a bug in tpc, not bad input: still one line, and no partial file (writes are atomic)
        if args.debug:
            raise
        if isinstance(err, TpcInternalError):  # a pass's bug, already said with its pass and node
            print(f"tpc: {err}", file=sys.stderr)
            return 3
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"tpc: internal error: {type(err).__name__}: {first}; {REPORT}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
