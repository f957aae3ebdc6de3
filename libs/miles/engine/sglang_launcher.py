"""One inference server process per engine: real SGLang or the CPU stand-in, started and stopped.

``kind="sglang"`` runs ``python -m sglang.launch_server``; ``kind="local"`` runs
``python -m miles.engine.sglang_server``. Both get ``--model-path``, ``--host``, ``--port`` and
``--weight-version`` (an integer, which ``SGLangClient`` parses back), then ``server_args`` as
given (``--tp-size 2``, ``--mem-fraction-static 0.7``, ... for SGLang).

As a Ray actor, ``ray.remote(num_gpus=n)(SGLangServerProcess)``: Ray sets
``CUDA_VISIBLE_DEVICES`` for the actor's process and the server inherits it, so the actor holds
its GPUs for as long as it lives and Ray places no other GPU actor on them. The server runs in
its own session (``stop`` ends its whole process group, SGLang's scheduler processes included)
and, on Linux, gets SIGTERM when the process that started it dies, so a killed actor does not
leave a server holding GPU memory. That signal follows the *thread* that called ``start``: call
it from the actor's main thread (the default for a non-threaded actor).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from miles.runtime.embedded import free_port

ServerKind = Literal["sglang", "local"]
MODULES: dict[ServerKind, str] = {
    "sglang": "sglang.launch_server",
    "local": "miles.engine.sglang_server",
}
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Health checks go straight to the server, whatever http_proxy the environment sets.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log."""


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent thread dies (Linux only)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SGLangServerProcess:
    """Start one server, wait until ``/health`` answers, stop it (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        kind: ServerKind,
        model_path: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        advertise_host: str | None = None,
        weight_version: int = 0,
        server_args: Sequence[str] = (),
        startup_timeout_seconds: float = 600.0,
        log_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.port = port if port is not None else free_port(host)
        # The address clients use: a server bound to every interface (0.0.0.0) is reached on
        # the node's own address, which the caller knows (on Ray: ray.util.get_node_ip_address).
        self.base_url = f"http://{advertise_host or host}:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            MODULES[kind],
            "--model-path",
            str(model_path),
            "--host",
            host,
            "--port",
            str(self.port),
            "--weight-version",
            str(weight_version),
            *server_args,
        ]
        self.startup_timeout_seconds = startup_timeout_seconds
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix=f"miles-{kind}-{self.port}-", suffix=".log")
            os.close(handle)
            log_path = name
        self.log_path = Path(log_path)
        self._env = {**os.environ, **(env or {})}
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Launch the server and return its base URL once ``/health`` answers 200."""
        if self._process is not None:
            raise RuntimeError(f"{self.base_url} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
                preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def restart(self) -> str:
        """Stop the server (if any is left) and start it again on the same port."""
        self.stop()
        self._process = None
        return self.start()

    def _wait_healthy(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_seconds
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise ServerStartError(self._report(f"exited with code {code} before healthy"))
            try:
                with _DIRECT.open(self.base_url + "/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while SGLang loads the model
            time.sleep(0.25)
        raise ServerStartError(
            self._report(f"not healthy after {self.startup_timeout_seconds:.0f}s")
        )

    def _report(self, what: str) -> str:
        command = " ".join(self.command)
        return f"{self.kind} server {self.base_url} {what}\ncommand: {command}\n{self.log_tail()}"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group's id."""
        return None if self._process is None else self._process.pid

    def server_pid(self) -> int | None:
        """``pid`` as a method, so a Ray actor handle can ask for it."""
        return self.pid

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, grace_seconds: float = 15.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_seconds``; exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                self._signal_group(process.pid, signal.SIGKILL)
                process.wait()
        # SGLang's scheduler processes share the group and may outlive its main process.
        self._signal_group(process.pid, signal.SIGKILL)
        return process.returncode

    @staticmethod
    def _signal_group(pid: int, signum: signal.Signals) -> None:
        # The server leads its own session, so its group id is its pid; ESRCH: all have exited.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    def __enter__(self) -> SGLangServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
