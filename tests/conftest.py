from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("TPC_CHECK_PASSES", "1")  # every pass run by a test is checked against passes/README.md
if os.environ.get("TPC_TOY_METHOD"):  # test_registry.py: a method registered as a new one would be
    import toy_method  # noqa: F401

SHARED = Path(os.environ.get("TPC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
MAX_WORKERS = 8  # beyond this, starting a worker (torch import, captures) costs more than it saves


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/* from the current output")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Spread the tests over the cores this process may use (pytest-xdist), one torch thread per
    worker, unless -n is given, xdist is off (-p no:xdist) or --pdb is on."""
    if (not config.pluginmanager.hasplugin("xdist") or config.option.numprocesses is not None
            or os.environ.get("PYTEST_XDIST_WORKER")):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 2 or config.getoption("usepdb"):
        return
    config.option.numprocesses = min(cores, MAX_WORKERS)
    if config.option.dist == "no":
        config.option.dist = "loadscope"  # a module's captures are made on one worker, not on each
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers and the `python -m tpc` they start: one thread per core


# The longest modules first (seconds of test time, longest first): with loadscope each module runs on one
# worker, and a long one handed out last would leave the other worker idle at the end of the run.
LONGEST_FIRST = ("test_vlm_llava.py", "test_vlm_decode.py", "test_onnx.py", "test_pipeline.py", "test_vlm_qwen2vl.py",
                 "test_families.py", "test_tune.py", "test_real_architectures.py", "test_vlm_smolvlm.py",
                 "test_decode_onnx.py", "test_hardening.py", "test_onnx_ops.py", "test_vlm_vtc.py", "test_cli.py",
                 "test_vlm_kvcache.py", "test_decode.py", "test_serving.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its own order


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_runtest_teardown(item):
    """A test that sets torch's threads (tpc bench does, for all cores) leaves its worker at one."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "vit_cifar10_timm.pth").is_file() or not (SHARED / "cifar10_test.npz").is_file():
        pytest.skip(f"needs the trained CIFAR-10 ViT and test images in {SHARED} (../shared/data beside the project)")
    return SHARED


def _fingerprint(model, inputs, kwargs, dynamic_length) -> str:
    """What torch.export's graph of ``model`` depends on: every submodule's class, forward and
    plain attributes, every parameter's and buffer's bytes, and the inputs' shapes and dtypes."""
    import torch

    h = hashlib.sha256(repr(dynamic_length).encode())
    for name, mod in model.named_modules():
        h.update(f"{name}:{type(mod).__module__}.{type(mod).__qualname__}:{type(mod).forward!r}".encode())
        h.update(repr([*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()]).encode())
        for key, value in sorted(vars(mod).items()):
            if not key.startswith("_"):  # parameters, buffers and submodules live in _-prefixed dicts
                h.update(f"{key}={value!r}".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())

    def shapes(x):
        if isinstance(x, torch.Tensor):
            return f"T{tuple(x.shape)}{x.dtype}"
        if isinstance(x, (tuple, list)):
            return f"({','.join(shapes(v) for v in x)})"
        if isinstance(x, dict):
            return "{" + ",".join(f"{k}:{shapes(v)}" for k, v in sorted(x.items())) + "}"
        return repr(x)

    h.update(shapes((inputs, kwargs or {})).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _reusing_captures(captures: dict):
    import tpc.pipeline as tpc_pipeline  # where tpc.compile captures

    real = tpc_pipeline.capture

    def capture(model, example_inputs, example_kwargs=None, dynamic_length=True):
        key = _fingerprint(model, example_inputs, example_kwargs, dynamic_length)
        if key not in captures:
            captures[key] = real(model, example_inputs, example_kwargs, dynamic_length)
        return copy.deepcopy(captures[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tpc_pipeline, "capture", capture)
        yield


@pytest.fixture(scope="session")
def _captures() -> dict:
    return {}


@pytest.fixture(autouse=True)
def reuse_captures(request, _captures):
    """tpc.compile captures each test model once per worker: later compiles of an identical model
    (same classes, attributes, weights, input shapes) get a copy of the graph torch.export made for
    the first one. torch.export is the slowest step of a tiny compile and is tested on its own; a
    test of what happens during a capture opts out with ``@pytest.mark.fresh_capture``."""
    if request.node.get_closest_marker("fresh_capture"):
        yield
        return
    with _reusing_captures(_captures):
        yield


@pytest.fixture(scope="session")
def compiled(_captures):
    """compiled(name, spec) -> the test model ``name`` pruned by ``spec`` at its first and last
    layer (keep 0.6, 0.5), the artifact the ONNX, TensorRT-compatibility and plugin tests share:
    compiled once per worker, handed out as a copy so a test may change it."""
    import tpc
    from models import TEST_MODELS
    from specs import parse_spec

    made = {}

    def get(name, spec):
        if (name, spec) not in made:
            factory, inputs, depth, _ = TEST_MODELS[name]
            method, options = parse_spec(spec)
            with _reusing_captures(_captures):
                made[name, spec] = tpc.compile(factory(), inputs(2), method=method, layers=[0, depth - 1],
                                               keep=[0.6, 0.5], options=options)
        return copy.deepcopy(made[name, spec])

    return get


@pytest.fixture(scope="session")
def decode_capture():
    """decode_capture(family) -> (the tiny seeded causal LM of ``test_decode.tiny(family)``, its captured
    decode step), captured once per worker and shared by the decode-time tests (tidal, quest, dhsa): the
    capture is the slow part, and every rewrite copies the program's graph."""
    from test_decode import tiny
    from tpc.decode import capture_step

    made = {}

    def get(family):
        if family not in made:
            model = tiny(family)
            made[family] = model, capture_step(model)
        return made[family]

    return get


@pytest.fixture(scope="session")
def vlms():
    """vlms(family) -> a tiny VLM, its captures and its dense-decode module (tests/test_vlm_decode.py's
    ``vlm_maker``), made once per worker for the sparse-decode and compressed-cache tests."""
    from test_vlm_decode import vlm_maker

    return vlm_maker()


@pytest.fixture(scope="session")
def exported(compiled, tmp_path_factory):
    """exported(name, spec) -> (compiled(name, spec), its .onnx file, tpc.export's result), exported once per worker."""
    import tpc

    made = {}

    def get(name, spec):
        if (name, spec) not in made:
            pm = compiled(name, spec)
            path = tmp_path_factory.mktemp("exported") / f"{name}_{spec}.onnx"
            made[name, spec] = path, tpc.export(pm, path)
        return compiled(name, spec), *made[name, spec]

    return get


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(*args, cwd=tests/) -> `tpc ARGS`'s CompletedProcess (returncode, stdout, stderr), run in
    this process through tpc.cli.main: no Python start and torch import per case. The CLI's own
    logging handler and Python's default warning filters write to the captured stderr as they
    would in `python -m tpc` (tests/test_cli.py runs that for real)."""
    import logging
    import subprocess
    import warnings

    from tpc.cli import main

    def run(*args, cwd=Path(__file__).parent):
        monkeypatch.chdir(cwd)
        argv = [str(a) for a in args]
        capsys.readouterr()
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        root.handlers.clear()  # so main's logging.basicConfig installs its handler on the captured stderr
        try:
            with warnings.catch_warnings():
                warnings.resetwarnings()
                warnings.simplefilter("default")
                for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", quiet)
                try:
                    code = main(argv)
                except SystemExit as exit:  # argparse's usage errors
                    code = exit.code
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["tpc", *argv], code, out, err)

    return run
