"""Model ids -> (module, example inputs).

Accepted ids, tried in this order:

- ``path/to/model.pt2``: a saved ``torch.export`` program;
- ``package.module:function``: a function returning a module, or (module, example inputs);
  ``torchvision.models:vit_b_16`` is one (random weights);
- a directory saved with Hugging Face ``save_pretrained``;
- a timm name (``deit_small_patch16_224``, ``timm/deit_small_patch16_224.fb_in1k``);
- a Hugging Face id (``facebook/deit-small-patch16-224``), from the local cache.

Weights: pretrained by default (downloaded or from the local cache), ``weights=PATH`` for a
state_dict / safetensors file, ``random_weights=True`` for architecture-only runs.
Everything is loaded without executing pickled code (``weights_only=True``, safetensors, and
``.pt2`` archives through :mod:`tpc.pt2`).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import pickle
import socket
import sys
import traceback
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tpc.errors import TpcError, check_readable
from tpc.pt2 import load_program
from tpc.schedule import check_seed
from tpc.vlm import is_vlm
from tpc.vlm.family import example_inputs as vlm_example_inputs, names_a_vlm

EXAMPLE_BATCH = 2
HUB_HOST = ("huggingface.co", 443)


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    example_inputs: tuple
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.example_inputs[0].shape[1:])


def parse_model_args(text: str | dict | None) -> dict:
    """``"img_size=32,patch_size=4"`` -> {"img_size": 32, "patch_size": 4} (values as Python literals)."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise TpcError(f"--model-args takes key=value pairs separated by commas, not {part!r}")
        key, value = (s.strip() for s in part.split("=", 1))
        if key in out:
            raise TpcError(f"{key} is given twice in {text!r}: give it once")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_numbers(text, cast, flag: str, example: str) -> tuple | None:
    """``"3,224,224"`` -> (3, 224, 224); None and tuples pass through."""
    if text is None or isinstance(text, tuple):
        return text
    try:
        return tuple(cast(p) for p in str(text).split(","))
    except ValueError:
        raise TpcError(f"--{flag} takes comma-separated numbers such as {example}, not {text!r}") from None


def parse_input_size(text) -> tuple[int, ...] | None:
    size = parse_numbers(text, int, "input-size", "3,224,224")
    if size is not None and (not size or any(n < 1 for n in size)):
        raise TpcError(f"--input-size {text!r}: every size is 1 or more (3,224,224 for images, a token count for text)")
    return size


def example_images(input_size: tuple[int, ...], batch: int = EXAMPLE_BATCH, seed: int = 0) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, *input_size), generator=gen),)


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A state_dict from .safetensors or a torch file, without unpickling arbitrary objects."""
    path = check_readable(path, "weights file", "a state_dict or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise TpcError(f"weights file {str(path)!r} is corrupt: not a valid safetensors file ({err})") from None
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if not head.startswith(b"\x80"):  # torch.save's legacy format is a pickle, which starts with PROTO
            raise TpcError(f"weights file {str(path)!r} is neither a torch checkpoint (torch.save) nor .safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says enough
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TpcError(f"weights file {str(path)!r} holds pickled Python objects besides tensors, which tpc never "
                       "unpickles: save model.state_dict() with torch.save, or a .safetensors file") from None
    except Exception as err:
        raise TpcError(f"weights file {str(path)!r} is corrupt or not a torch checkpoint: "
                       f"{type(err).__name__}: {err}".splitlines()[0]) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TpcError(f"{str(path)!r} holds a {type(state).__name__}, not a state_dict of tensors")
    return state


def _kind(dtype: torch.dtype) -> str:
    return ("bool" if dtype == torch.bool else "complex" if dtype.is_complex else
            "float" if dtype.is_floating_point else "integer")


def apply_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load ``path`` into ``module``; a mismatch names the first keys concerned and both shapes."""
    state = load_state_dict_file(path)
    own = module.state_dict()
    wrong = [f"{k} {list(v.shape)} in the file, {list(own[k].shape)} in the model"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    kinds = [f"{k} {str(v.dtype).split('.')[-1]} in the file, {str(own[k].dtype).split('.')[-1]} in the model"
             for k, v in state.items() if k in own and _kind(v.dtype) != _kind(own[k].dtype)]
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]})")
    if kinds:  # load_state_dict would cast them silently: integer copies of float weights are not the weights
        parts.append(f"{len(kinds)} of another kind of number (e.g. {kinds[0]})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if parts:
        raise TpcError(f"weights in {str(path)!r} do not fit the model: {', '.join(parts)}; check --model-args")
    module.load_state_dict(state, strict=True)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable():
    """Use only the local cache when the hub cannot be reached (no minute of retries)."""
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        yield True
        return
    online = _hub_reachable()
    saved = hub.HF_HUB_OFFLINE
    if not online:
        hub.HF_HUB_OFFLINE = True
    try:
        yield online
    finally:
        hub.HF_HUB_OFFLINE = saved


def _load_pt2(path: Path) -> LoadedModel:
    ep = load_program(path)
    _check_recompilable(ep, path)
    module = ep.module()
    inputs = None
    if ep.example_inputs is not None:
        args, _kwargs = ep.example_inputs
        inputs = tuple(args)
    if inputs is None or inputs[0].shape[0] < EXAMPLE_BATCH:
        shapes = [n.meta["val"].shape for n in ep.graph.find_nodes(op="placeholder") if n.name in ep.graph_signature.user_inputs]
        inputs = tuple(torch.randn(EXAMPLE_BATCH, *[int(s) for s in shape[1:]]) for shape in shapes)
    return LoadedModel(path.name, module, inputs)


def _check_recompilable(ep: torch.export.ExportedProgram, path: Path) -> None:
    """A .pt2 exported with a dynamic batch: a program specialised to one batch size cannot become
    the any-batch artifact tpc writes."""
    inputs = [n.meta["val"] for n in ep.graph.find_nodes(op="placeholder") if n.name in ep.graph_signature.user_inputs]
    tensors = [v for v in inputs if isinstance(v, torch.Tensor) and v.dim() > 0]
    if tensors and all(isinstance(v.shape[0], int) for v in tensors):
        raise TpcError(f"{path.name!r} was exported with a fixed batch of {tensors[0].shape[0]} and tpc writes "
                       "artifacts for any batch: export it again with a dynamic batch (torch.export.export(model, "
                       "args, dynamic_shapes=... with Dim.DYNAMIC on dim 0)) or give tpc the module itself")


def is_pruned(module: nn.Module) -> bool:
    """Whether ``module`` is a program tpc pruned (a .pt2 it wrote): its graph holds ``tpc::`` nodes."""
    graph = getattr(module, "graph", None)
    return isinstance(graph, torch.fx.Graph) and any(getattr(n.target, "namespace", None) == "tpc" for n in graph.nodes)


def refuse_pruned(module: nn.Module, name: str) -> None:
    """Pruning a program tpc already pruned (a .pt2 it wrote) is refused: its ``tpc::`` nodes are
    not inputs tpc's passes take; the original model with the combined schedule is the way."""
    if is_pruned(module):
        raise TpcError(f"{name} was already pruned by tpc: compile the original model with the combined schedule "
                       "(--layers/--keep over all layers) instead")


TEXT_LENGTH = 128


def hf_example_inputs(config, module, input_size) -> tuple | dict:
    if is_vlm(module):
        if input_size is not None and (len(input_size) != 1 or input_size[0] < 1):
            raise TpcError(f"--input-size of a vision-language model is its text tokens per prompt (one number, 1 "
                           f"or more, e.g. 64), not {','.join(map(str, input_size))}")
        return vlm_example_inputs(module, text=int(input_size[0])) if input_size else vlm_example_inputs(module)
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        size = input_size or (config.num_channels, config.image_size, config.image_size)
        return example_images(size)
    if getattr(config, "vocab_size", None):
        if input_size is not None and (len(input_size) != 1 or input_size[0] < 2):
            raise TpcError(f"--input-size of a text model is its example length in tokens (one number, 2 or more, e.g. "
                           f"64), not {','.join(map(str, input_size))}: {type(module).__name__} takes token ids, not images")
        if input_size:
            check_text_length(module, input_size[0], "--input-size")
        length = int(input_size[0]) if input_size else min(TEXT_LENGTH, getattr(config, "max_position_embeddings", TEXT_LENGTH))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1000 if config.vocab_size > 2000 else 1, config.vocab_size, (EXAMPLE_BATCH, length), generator=gen)
        return ids, torch.ones(EXAMPLE_BATCH, length, dtype=torch.int64)
    raise TpcError(f"cannot make example inputs for {type(module).__name__}: pass --input-size")


def check_text_length(module: nn.Module, length: int, flag: str) -> None:
    """``length`` tokens fit the model's position table (``max_position_embeddings`` of any config in it)."""
    limits = [c.max_position_embeddings for c in (getattr(m, "config", None) for m in module.modules())
              if isinstance(getattr(c, "max_position_embeddings", None), int)]
    if limits and length > min(limits):
        raise TpcError(f"{flag} {length}: {type(module).__name__} takes at most {min(limits)} tokens "
                       f"(max_position_embeddings); give a length of {min(limits)} or less")


@contextlib.contextmanager
def _quiet(transformers):
    """No progress bars or load reports from transformers while tpc loads (tpc says what matters in one
    line); the caller's settings are restored."""
    logging, bars = transformers.utils.logging, transformers.utils.logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _refuse_unfitting(model_id: str, cls_name: str, report: dict) -> None:
    """Weights missing for the model or of other shapes would be drawn at random: refused, not run.
    (Unexpected keys, such as a pretraining head the model does not have, are left out as usual.)"""
    missing = sorted(report.get("missing_keys") or [])
    mismatched = [k if isinstance(k, str) else k[0] for k in report.get("mismatched_keys") or []]
    if missing or mismatched:
        parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + (
            [f"{len(mismatched)} with other shapes (e.g. {mismatched[0]})"] if mismatched else [])
        raise TpcError(f"the weights in {model_id!r} do not fit {cls_name}, the model its config.json describes: "
                       f"{', '.join(parts)}, which would be random; save the model and its config together "
                       "(save_pretrained), or pass --random-weights for an architecture-only run")


def _load_hf(model_id: str, weights, random_weights: bool, model_args: dict, input_size) -> LoadedModel:
    try:
        import transformers
    except ImportError:
        raise TpcError("transformers is not installed: pip install 'tpc[transformers]'") from None
    local = Path(model_id).is_dir()
    if model_args.pop("trust_remote_code", False):
        raise TpcError("--model-args trust_remote_code=True: tpc never runs a model repository's own code; "
                       "use a model whose architecture transformers ships")
    model_args["trust_remote_code"] = False  # never prompt, never run the directory's or the hub repo's .py files
    with _offline_unless_reachable() as online, _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(model_id, local_files_only=not online, **model_args)
        except Exception as err:
            if "trust_remote_code" in str(err):
                raise TpcError(f"{model_id!r} needs its own Python code (auto_map in its config.json): custom code "
                               "is never run by tpc, and was not; use a model whose architecture transformers "
                               "ships") from None
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            if local and (Path(model_id) / "config.json").is_file():
                raise TpcError(f"cannot load Hugging Face model {model_id!r}: its config.json does not load "
                               f"({type(err).__name__}: {first}); fix it, or save the model again with "
                               "save_pretrained") from err
            where = "this directory has no config.json" if local else (
                "the hub is unreachable and the local cache has no copy" if not online
                else f"no such model on the hub, or its config does not load: {first}")
            raise TpcError(
                f"cannot load Hugging Face model {model_id!r} ({where}): download it once where the hub is reachable, "
                "or pass a directory saved with save_pretrained"
            ) from None
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        if random_weights or weights is not None:
            module = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
        else:
            try:
                module, report = cls.from_pretrained(model_id, local_files_only=not online, output_loading_info=True,
                                                     ignore_mismatched_sizes=True, **model_args)  # refused below
            except Exception as err:
                raise TpcError(f"cannot load the weights of {model_id!r}: {str(err).splitlines()[0]}; "
                               "pass --random-weights for an architecture-only run") from None
            _refuse_unfitting(model_id, type(module).__name__, report)
    if weights is not None:
        apply_weights(module, weights)
    module.eval()
    loaded = LoadedModel(model_id, module, hf_example_inputs(config, module, input_size))
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(model_id, local_files_only=True,
                                                                    trust_remote_code=False)
        loaded.mean, loaded.std = tuple(processor.image_mean), tuple(processor.image_std)
    except Exception:
        pass
    return loaded


@contextlib.contextmanager
def _seeded(seed: int):
    """Random initialisation drawn from ``seed``; the caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def could_be_vlm(model_id: str) -> bool:
    """Whether ``model_id`` may name a vision-language model, known without loading it: a timm name
    or a file never does, a directory's or a hub id's config.json says, a function may."""
    lower = model_id.lower()
    if lower.endswith((".pt2", ".onnx")) or model_id.startswith("timm/"):
        return False
    if ":" in model_id and not os.path.exists(model_id):
        return True
    if (Path(model_id) / "config.json").is_file():
        return names_a_vlm(model_id, unreadable=True)  # unreadable: the load says what is wrong with it
    if not _looks_like_hf(model_id):
        return False
    config = _hub_config(model_id)
    return config is None or names_a_vlm(config.parent, unreadable=True)  # None: the load says why


def _hub_config(model_id: str) -> Path | None:
    """A hub id's config.json alone (from the local cache, or the hub when reachable): no weights
    are fetched; None when it cannot be had."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    with _offline_unless_reachable() as online:
        try:
            return Path(hf_hub_download(model_id, "config.json", local_files_only=not online))
        except Exception:  # no such repo, no network, no cached copy: the load says which
            return None


def _looks_like_hf(model_id: str) -> bool:
    path = Path(model_id)
    return (path / "config.json").is_file() or (model_id.count("/") == 1 and not path.exists())


def _load_function(spec: str, input_size) -> LoadedModel:
    mod_name, fn_name = spec.rsplit(":", 1)
    if not mod_name.strip() or not fn_name.strip():
        raise TpcError(f"{spec!r} is not a model id: a module:function names both, e.g. benchmarks.cifar_vit:model")
    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise TpcError(f"cannot import {spec!r}: {err}") from err
    except Exception as err:
        raise TpcError(f"importing {mod_name!r} for {spec!r} raised {_user_error(err)}") from err
    finally:
        sys.path.pop(0)
    if not callable(fn):
        raise TpcError(f"{spec!r} is a {type(fn).__name__}, not a function returning a model")
    try:
        made = fn()
    except Exception as err:
        raise TpcError(f"{spec!r} raised {_user_error(err)}") from err
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        module, inputs = made
        inputs = inputs if isinstance(inputs, tuple) or hasattr(inputs, "keys") else (inputs,)  # a dict stays one
    elif isinstance(made, nn.Module):
        module = made
        size = input_size or image_size_of(module)
        if size is None:
            raise TpcError(f"{spec!r} returned a module without example inputs: pass --input-size, e.g. 3,224,224")
        inputs = example_images(size)
    else:
        raise TpcError(f"{spec!r} returned {type(made).__name__}; it must return an nn.Module or (module, example_inputs)")
    return LoadedModel(spec, module, inputs)


def _user_error(err: BaseException) -> str:
    """``Type: message (at file:line)``, the line being the innermost frame of the user's code."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename != __file__]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}{where}"


def _load_timm(name: str, weights, random_weights: bool, model_args: dict, input_size) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise TpcError("timm is not installed: pip install 'tpc[timm]'") from None
    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        raise TpcError(
            f"unknown model id {name!r}: not a timm model, a Hugging Face id or directory, a .pt2 file or a "
            "module:function (list timm names with `python -c \"import timm; print(timm.list_models('*vit*'))\"`)"
        )
    pretrained = not random_weights and weights is None
    try:
        if pretrained:
            with _offline_unless_reachable() as online:
                try:
                    module = timm.create_model(name, pretrained=True, **model_args)
                except Exception as err:
                    where = "the Hugging Face hub is unreachable and the local cache has no copy" if not online else str(err).splitlines()[0]
                    raise TpcError(
                        f"cannot get pretrained weights for {name!r} ({where}): pass --weights FILE with a "
                        "state_dict/safetensors file, or --random-weights for an architecture-only run"
                    ) from None
        else:
            module = timm.create_model(name, pretrained=False, **model_args)
    except TypeError as err:
        raise TpcError(f"timm cannot build {name!r} with --model-args {model_args}: {err}") from None
    if weights is not None:
        apply_weights(module, weights)
    size = input_size or _timm_input_size(module, getattr(module, "pretrained_cfg", {}) or {})
    return LoadedModel(name, module, example_images(size))


def image_size_of(module: nn.Module) -> tuple[int, ...] | None:
    """An image model's input size when the module says it (torchvision's ViT: ``image_size``)."""
    size = getattr(module, "image_size", None)
    if isinstance(size, int):
        return (3, size, size)
    if getattr(module, "patch_embed", None) is not None:
        return _timm_input_size(module, getattr(module, "pretrained_cfg", {}) or {})
    return None


def _timm_input_size(module: nn.Module, cfg: dict) -> tuple[int, ...]:
    embed = getattr(module, "patch_embed", None)
    img = getattr(embed, "img_size", None)
    chans = getattr(getattr(embed, "proj", None), "in_channels", None)
    if img is not None and chans is not None:
        return (int(chans), int(img[0]), int(img[1]))
    return tuple(cfg.get("input_size", (3, 224, 224)))


def load(model_id: str, weights: str | None = None, random_weights: bool = False, model_args=None,
         input_size=None, weights_seed: int | None = None) -> LoadedModel:
    """Resolve a model id to a module and example inputs (batch of 2).

    ``random_weights`` are drawn with ``weights_seed`` (default 0), the same way for timm and
    Hugging Face models, without touching the global RNG. It is apart from the random method's
    seed, so changing the draw of kept tokens never changes the model.
    """
    if random_weights and weights is not None:
        raise TpcError("--weights and --random-weights contradict each other: pass one")
    if weights_seed is not None and not random_weights:
        raise TpcError("--weights-seed draws --random-weights; without them it does nothing: add --random-weights, "
                       "or drop --weights-seed (--seed seeds the random method)")
    seed = check_seed(weights_seed or 0, "--weights-seed")
    model_args = parse_model_args(model_args)
    input_size = parse_input_size(input_size)
    if model_id.lower().endswith(".onnx"):
        raise TpcError(f"{model_id!r} is an ONNX file: tpc compiles PyTorch models (a timm name, a Hugging Face id or "
                       "directory, a .pt2 program, a module:function) and writes ONNX files as its output")
    if model_id.lower().endswith(".pt2"):
        given = [flag for flag, value in (("--weights", weights), ("--random-weights", random_weights),
                                          ("--model-args", model_args), ("--input-size", input_size)) if value]
        if given:
            raise TpcError(f"{' and '.join(given)} cannot apply to a .pt2 program: it holds its own weights, "
                           "architecture and input shape; drop them, or pass the model they belong to")
        loaded = _load_pt2(Path(model_id))
    elif ":" in model_id and not os.path.exists(model_id):
        if model_args:
            raise TpcError(f"--model-args cannot apply to {model_id!r}: your function builds the model, so give it "
                           "the arguments itself")
        loaded = _load_function(model_id, input_size)
        if weights is not None:
            apply_weights(loaded.module, weights)
    elif model_id.startswith("timm/") or not _looks_like_hf(model_id):
        name = model_id[len("timm/"):] if model_id.startswith("timm/") else model_id
        with _seeded(seed):
            loaded = _load_timm(name, weights, random_weights, model_args, input_size)
    else:
        with _seeded(seed):
            loaded = _load_hf(model_id, weights, random_weights, model_args, input_size)
    if random_weights:
        loaded.notes.append("random weights")
    cfg = getattr(loaded.module, "pretrained_cfg", None) or {}
    loaded.mean = loaded.mean or (tuple(cfg["mean"]) if "mean" in cfg else None)
    loaded.std = loaded.std or (tuple(cfg["std"]) if "std" in cfg else None)
    return loaded
