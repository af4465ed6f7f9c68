"""The ``tritonserver`` that ``nvidia-pytriton`` bundles, started on a model repository.

The wheel ships the server binary, its Python backend and one Python stub per interpreter
version (``python_backend_stubs/3.X``); the stub links ``libpython3.X.so`` by name, so the
dynamic loader would pick the system's copy, and a different patch release of the same
3.X fails at the first lock (``'_thread.RLock' object has no attribute '_recursion_count'``,
pytriton issue #51). The server therefore runs with this interpreter's own library folder
first on ``LD_LIBRARY_PATH`` and its ``bin`` folder first on ``PATH`` (where the stub finds
the virtual environment, and so numpy and ONNX Runtime). The backend folder with the right
stub is assembled from links in a temporary folder, which ``stop`` removes with the server
and its stub processes (one process group).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tpc.errors import TpcError

EXIT_TIMEOUT_S = 10  # on SIGTERM the server waits this long for requests in flight, then exits
PR_SET_PDEATHSIG = 1  # prctl(2)
INSTALL = 'tpc serve needs the Triton server bundled by nvidia-pytriton: pip install "tpc[serve]"'


def bundled_server() -> Path:
    """The ``tritonserver`` folder inside the installed ``nvidia-pytriton`` (bin/, backends/, stubs)."""
    try:
        import pytriton
    except ImportError:
        raise TpcError(INSTALL) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TpcError(f"nvidia-pytriton at {root.parent} has no tritonserver binary; reinstall it: {INSTALL}")
    return root


def server_env() -> dict[str, str]:
    """The environment the server and its Python stub need (see the module docstring)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    libs = [libdir] if libdir else []
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _backends(root: Path, into: Path) -> Path:
    """A backend folder: the bundled Python backend with the stub for this interpreter's version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TpcError(f"the bundled Triton server has no Python stub for Python {version}: run tpc serve with "
                       f"Python {', '.join(sorted(p.name for p in (root / 'python_backend_stubs').iterdir()))}")
    python = into / "backends" / "python"
    python.mkdir(parents=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            os.symlink(f, python / f.name)
    os.symlink(stub, python / "triton_python_backend_stub")
    return into / "backends"


def _end_with_parent() -> None:
    """In the server's process, before exec: SIGTERM it when the thread that started it dies, so a
    killed ``tpc serve`` (SIGKILL, which it cannot catch) leaves no server behind."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Server:
    """A running ``tritonserver``: its ports, process, the log file, and the folder it owns."""

    http_port: int
    grpc_port: int
    metrics_port: int
    process: subprocess.Popen
    workdir: Path
    log: Path
    shm_prefix: str

    @property
    def url(self) -> str:
        return f"http://localhost:{self.http_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 20) -> None:
        """SIGTERM to the server (it finishes the requests in flight, unloads its models and ends
        their stubs), SIGKILL to its process group after ``timeout``; then the temporary folder goes."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # stubs the server left (they share its group)
            self.process.wait()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()


def start(repo: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          workdir: Path | None = None, timeout: float = 120.0) -> Server:
    """Start the bundled server on ``repo`` and wait until every model in it is ready.

    ``workdir`` (a fresh temporary folder by default) receives the backend folder and the log,
    and is removed by ``Server.stop``.
    """
    ports = (("--port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port))
    for flag, port in ports:
        if not 1 <= port <= 65535:
            raise TpcError(f"{flag} {port}: a port is a number from 1 to 65535")
    for (flag, port), (other, same) in zip(ports, ports[1:] + ports[:1]):
        if port == same:
            raise TpcError(f"{flag} and {other} are both {port}: the HTTP, gRPC and metrics ports must differ")
    root = bundled_server()
    for flag, port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as err:
                raise TpcError(f"{flag} {port}: cannot listen there ({err.strerror}); choose another port") from None
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tpc-serve-"))
    shm_prefix = f"tpc{os.getpid()}x{http_port}_"
    log = workdir / "tritonserver.log"
    try:
        backends = _backends(root, workdir)
        command = [str(root / "bin" / "tritonserver"), f"--model-repository={repo}",
                   f"--backend-directory={backends}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
                   f"--metrics-port={metrics_port}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                   "--metrics-address=127.0.0.1",
                   f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
                   f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--exit-on-error=true", "--strict-readiness=true",
                   "--log-verbose=0"]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=server_env(), start_new_session=True, preexec_fn=_end_with_parent)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = Server(http_port, grpc_port, metrics_port, process, workdir, log, shm_prefix)
    try:
        deadline = time.monotonic() + timeout
        while not server.ready():
            if process.poll() is not None:
                raise TpcError(f"tritonserver exited with code {process.returncode} before it was ready:\n"
                               f"{server.log_tail()}")
            if time.monotonic() > deadline:
                raise TpcError(f"tritonserver was not ready after {timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    return server
