"""Ray: start a local head for `miles run`, or join an existing cluster.

Ray's files (sessions, logs, sockets) stay inside the run directory. Unix socket paths are
limited to ~107 bytes, so a deep run directory falls back to a short directory under /tmp.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import ray

log = logging.getLogger(__name__)


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
    return str(ray.get_runtime_context().gcs_address)


def connect(address: str | None, namespace: str) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``) as a driver in the run's namespace."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RuntimeError("no Ray cluster: set RAY_ADDRESS (or infra.ray_address)")
    ray.init(address=address, namespace=namespace, log_to_driver=False, configure_logging=False)
