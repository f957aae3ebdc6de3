"""Ray: start a local head for `miles run`, or join an existing cluster.

Ray's files (sessions, logs, sockets) stay inside the run directory. Unix socket paths are
limited to ~107 bytes, so a deep run directory falls back to a short directory under /tmp.

A local head runs with Ray's token authentication, on by default for local clusters since Ray
2.59 (``RAY_AUTH_MODE=token``): otherwise any process that reaches a Ray port can run code on
the machine. Ray keeps the token in ``~/.ray/auth_token`` (made on first use), or takes
``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``; the services `miles run` starts inherit the mode.
``RAY_AUTH_MODE=disabled`` opts out, with a warning. On a cluster, the mode and token are the
cluster's: set them on every node.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import ray

log = logging.getLogger(__name__)
AUTH_MODE = "RAY_AUTH_MODE"


def ray_temp_dir(run_dir: Path) -> Path:
    """``<run_dir>/ray``, reached through a short symlink when its path is too long.

    Ray appends ``session_<date>_<pid>/sockets/plasma_store`` (~70 bytes); a Unix socket path
    must stay under 108 bytes. The files still live in the run directory.
    """
    target = (run_dir / "ray").resolve()
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target)) <= 36:
        return target
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:10]
    link = Path(f"/tmp/miles-ray-{digest}")
    if not link.is_symlink():
        link.symlink_to(target, target_is_directory=True)
    return link


def start_local(run_dir: Path, num_cpus: int | None = None) -> str:
    """Start a Ray head owned by this process; return the address services join."""
    ray.init(
        _temp_dir=str(ray_temp_dir(run_dir)),
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=False,
        configure_logging=False,
    )
    # Ray turns token auth on (and exports the mode to child processes) in ray.init; setting
    # the variable here beforehand would not reach its already-loaded config.
    if os.environ.get(AUTH_MODE) != "token":
        log.warning("Ray token authentication is off (%s=%s)", AUTH_MODE, os.environ.get(AUTH_MODE))
    return str(ray.get_runtime_context().gcs_address)


def connect(address: str | None, namespace: str) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``) as a driver in the run's namespace."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RuntimeError("no Ray cluster: set RAY_ADDRESS (or infra.ray_address)")
    ray.init(address=address, namespace=namespace, log_to_driver=False, configure_logging=False)
