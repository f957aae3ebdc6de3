"""The local Ray head `miles run` starts requires Ray's token: a driver holding it joins, one
holding another token is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from miles.runtime import raycluster

pytestmark = pytest.mark.integration

JOIN = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("joined with", ray.cluster_resources().get("CPU"), "CPUs")
"""


def join(address: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", JOIN, address],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_driver_needs_the_clusters_token(ray_cluster: str) -> None:
    assert os.environ[raycluster.AUTH_MODE] == "token"  # what `miles run`'s services inherit
    joined = join(ray_cluster)
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert "joined with 4.0 CPUs" in joined.stdout
    # Two connection attempts (~1 s each), not the default ~20 s of retries.
    refused = join(ray_cluster, RAY_AUTH_TOKEN="f" * 32, RAY_gcs_server_port_wait_time_s="2")
    assert refused.returncode != 0
    assert "auth" in refused.stderr.lower(), refused.stderr[-2000:]
