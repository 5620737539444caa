"""deploy/: the manifests parse, and agree with the code and with each other.

No Kubernetes here: what can drift silently is checked instead. Settings the code never
reads, a Ray image or RayCluster version other than the one pyproject.toml pins, a Service
pointing at a port the server does not listen on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def containers() -> list[dict[str, Any]]:
    found = []
    for doc in documents():
        spec = doc["spec"]
        templates = [spec.get("template"), spec.get("headGroupSpec", {}).get("template"),
                     *(g["template"] for g in spec.get("workerGroupSpecs", []))]
        for template in filter(None, templates):
            found += template["spec"]["containers"]
    return found


def pinned_ray_version() -> str:
    match = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml no longer pins ray as ray[...]>=X,<Y"
    return match.group(1)


def test_every_manifest_parses_into_kubernetes_objects() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "RayCluster", "Service"]
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in documents())


def test_orch_settings_in_the_manifests_are_ones_the_code_reads() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "orchestrator").rglob("*.py"))
    names = {e["name"] for c in containers() for e in c.get("env", [])}
    names |= set(re.findall(r"\b(ORCH_[A-Z_]+)\b", (DEPLOY / "Dockerfile").read_text()))
    names |= set(re.findall(r"\b(ORCH_[A-Z_]+)\b", (DEPLOY / "README.md").read_text()))
    orch = {n for n in names if n.startswith("ORCH_")}
    assert orch, "the manifests configure orch through ORCH_* variables"
    unread = sorted(n for n in orch if f'"{n}"' not in source)
    assert not unread, f"set in deploy/ but never read by orchestrator/: {unread}"


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
    [server] = deployment["spec"]["template"]["spec"]["containers"]
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
