"""deploy/: the manifests parse, and agree with the code, with each other and with the
security model (docs/security.md).

No Kubernetes here: what can drift silently is checked instead. Settings the code does not
have, a Ray image or RayCluster version other than the one pyproject.toml pins, a Service
pointing at a port the server does not listen on, a Ray pod that could read the database's
credentials, a server that is not a team server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from orchestrator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def pods() -> list[tuple[str, dict[str, Any]]]:
    """(which, pod spec) of every pod template: "server", "ray-head", "ray-worker"."""
    found = []
    for doc in documents():
        spec = doc["spec"]
        if doc["kind"] == "Deployment":
            found.append(("server", spec["template"]["spec"]))
        if doc["kind"] == "RayCluster":
            found.append(("ray-head", spec["headGroupSpec"]["template"]["spec"]))
            found += [("ray-worker", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return found


def containers(init: bool = False) -> list[dict[str, Any]]:
    """Every pod's containers (with `init`, their init containers too)."""
    found = []
    for _, pod in pods():
        found += pod["containers"] + (pod.get("initContainers", []) if init else [])
    return found


def server_container() -> dict[str, Any]:
    [deployment] = by_kind("Deployment")
    [server] = deployment["spec"]["template"]["spec"]["containers"]
    return server


DATABASE_SECRET = "orch-database"


def pinned_ray_version() -> str:
    match = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml no longer pins ray as ray[...]>=X,<Y"
    return match.group(1)


def test_every_manifest_parses_into_kubernetes_objects() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["Deployment", "Ingress", "PersistentVolumeClaim", "RayCluster", "Service"]
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in documents())


def test_every_orch_variable_in_deploy_is_a_setting() -> None:
    settings = {f"ORCH_{name.upper()}" for name in Settings.model_fields}
    names = {e["name"] for c in containers(init=True) for e in c.get("env", [])}
    names |= set(re.findall(r"\b(ORCH_[A-Z_]+[A-Z])\b", (DEPLOY / "Dockerfile").read_text()))
    names |= set(re.findall(r"\b(ORCH_[A-Z_]+[A-Z])\b", (DEPLOY / "README.md").read_text()))
    orch = {n for n in names if n.startswith("ORCH_")}
    assert orch, "the manifests configure orch through ORCH_* variables"
    assert sorted(orch - settings) == [], "set in deploy/ but not a setting of orch"


def _secrets_of(pod: dict[str, Any], container: dict[str, Any]) -> set[str]:
    """Names of the Secrets a container can read: env, envFrom and mounted volumes."""
    names = {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})}
    names |= {f["secretRef"]["name"] for f in container.get("envFrom", []) if "secretRef" in f}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def test_only_the_server_can_read_the_database_credentials() -> None:
    """Workers report through the server's API: no Ray pod gets a database URL, by name or
    by Secret, and the server does not hand one on (ORCH_WORKER_DATABASE_URL is gone)."""
    for which, pod in pods():
        for container in pod["containers"] + pod.get("initContainers", []):
            env = {e["name"] for e in container.get("env", [])}
            assert "ORCH_WORKER_DATABASE_URL" not in env
            if which == "server" and container in pod["containers"]:
                assert DATABASE_SECRET in _secrets_of(pod, container)
                continue
            assert not env & {"ORCH_DATABASE_URL", "DATABASE_URL", "PGPASSWORD"}, which
            assert DATABASE_SECRET not in _secrets_of(pod, container), which
    assert "ORCH_WORKER_DATABASE_URL" not in (DEPLOY / "README.md").read_text()


def test_the_server_is_a_team_server_with_closed_roots() -> None:
    server = server_container()
    command = server["command"]
    assert command[:2] == ["orch", "server"]
    assert command[command.index("--auth") + 1] == "users"  # every request needs a user
    env = {e["name"]: e.get("value") for e in server["env"]}
    for name in ("ORCH_DATA_ROOTS", "ORCH_STORAGE_ROOTS", "ORCH_ALLOWED_URL_SCHEMES"):
        assert env.get(name), f"{name}: the team server names its roots explicitly"
    assert all(root.startswith(("/", "s3://")) for root in
               env["ORCH_DATA_ROOTS"].split(",") + env["ORCH_STORAGE_ROOTS"].split(","))
    assert set(env["ORCH_ALLOWED_URL_SCHEMES"].split(",")) <= {"s3", "gs", "az"}
    # Every directory root is made before the server starts (it refuses to start without).
    [deployment] = by_kind("Deployment")
    [init] = deployment["spec"]["template"]["spec"]["initContainers"]
    dirs = [r for r in env["ORCH_DATA_ROOTS"].split(",") + env["ORCH_STORAGE_ROOTS"].split(",")
            if r.startswith("/")]
    assert init["command"][:2] == ["mkdir", "-p"] and set(dirs) <= set(init["command"][2:])
    assert init["image"] == server["image"]


def test_workers_reach_the_server_at_its_service_and_people_through_tls() -> None:
    server = server_container()
    port = int(server["command"][server["command"].index("--port") + 1])
    [service] = by_kind("Service")
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["ORCH_ADVERTISED_URL"] == f"http://{service['metadata']['name']}:{port}"
    [ingress] = by_kind("Ingress")
    [tls] = ingress["spec"]["tls"]
    assert tls["secretName"] and tls["hosts"]
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in tls["hosts"]  # no host served without TLS
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_ray_versions_match_the_pinned_ray() -> None:
    pinned = pinned_ray_version()
    [cluster] = by_kind("RayCluster")
    assert cluster["spec"]["rayVersion"].startswith(pinned)
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert base and base.group(1).startswith(pinned), base


def test_every_pod_uses_one_image_with_ray_token_auth() -> None:
    images = {c["image"] for c in containers()}
    assert len(images) == 1, images  # one orch + Ray + torch everywhere
    for container in containers():
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "ray-auth-token"


def test_the_server_service_and_probe_reach_the_port_it_listens_on() -> None:
    [deployment] = by_kind("Deployment")
    server = server_container()
    command = server["command"]
    assert command[:2] == ["orch", "server"]
    port = int(command[command.index("--port") + 1])
    named = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert named["http"] == port
    [service] = by_kind("Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert all(p["targetPort"] == "http" for p in service["spec"]["ports"])
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    # The server's RAY_ADDRESS is KubeRay's head service for this RayCluster.
    [cluster] = by_kind("RayCluster")
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
