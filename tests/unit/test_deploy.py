"""deploy/ and docker-compose.yml hold together: compose resolves (with `docker compose` when it
is installed, else checked as YAML here), every service exports traces to the collector and
serves /metrics where Prometheus scrapes it, and Prometheus accepts the configs and rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from miles.runtime.permissions import IDENTITIES

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = ("coordinator", "rollout", "reward", "buffer", "trainer")


def compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    found = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return found.returncode == 0


@pytest.mark.skipif(not compose_available(), reason="no `docker compose` on this machine")
def test_docker_compose_config() -> None:
    done = subprocess.run(
        ["docker", "compose", "--env-file", "deploy/compose.env.example", "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_compose_wires_observability() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"prometheus", "grafana", "otel-collector", "jaeger"} <= set(services)
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    ports = {job["job_name"]: job["dns_sd_configs"][0]["port"] for job in scrape["scrape_configs"]}
    for name in SERVICES:
        environment = services[name]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
        assert int(environment["MILES_METRICS_PORT"]) == ports[name]
        assert environment["RAY_ADDRESS"] == "ray-head:6380"  # the shared env is merged in
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    # Every named volume is declared; every bind mount exists in the repo.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    # The secrets compose requires are all in the example env file.
    example = (ROOT / "deploy" / "compose.env.example").read_text()
    passwords = [
        f"{system}_{i.upper()}_PASSWORD" for system in ("NATS", "REDIS") for i in IDENTITIES
    ]
    for secret in (*passwords, "RAY_AUTH_TOKEN", "GRAFANA_PASSWORD"):
        assert f"{secret}=" in example
        assert f"${{{secret}:?" in COMPOSE.read_text()


def test_entrypoint_passes_the_metrics_port() -> None:
    assert (
        "infra.metrics_port=$MILES_METRICS_PORT" in (ROOT / "deploy" / "entrypoint.sh").read_text()
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (Debian's prometheus)")
def test_promtool_accepts_the_local_config_and_the_rules() -> None:
    for command in (
        ["promtool", "check", "config", "deploy/prometheus/local.yml"],
        ["promtool", "check", "rules", "deploy/prometheus/alerts.yml"],
    ):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
