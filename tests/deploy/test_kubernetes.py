"""The Kubernetes manifests parse, and every port, flag, probe and Service in them matches the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from entrypoints.cli import build_parser

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents() -> list[dict]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def containers() -> list[tuple[dict, dict]]:
    return [(deployment, container) for deployment in by_kind("Deployment")
            for container in deployment["spec"]["template"]["spec"]["containers"]]


def test_manifests_parse_and_cover_every_role():
    roles = {d["metadata"]["labels"]["role"] for d in by_kind("Deployment")}
    assert roles == {"target", "draft", "coordinator", "gateway"}
    assert len(by_kind("HorizontalPodAutoscaler")) == 3
    for deployment in by_kind("Deployment"):
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("index", range(4))
def test_container_arguments_are_valid_cli(index):
    deployment, container = containers()[index]
    args = build_parser().parse_args(container["args"])  # exits (fails the test) on an unknown flag
    assert args.command == deployment["metadata"]["labels"]["role"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert args.port in ports
    if getattr(args, "metrics_port", None):
        assert args.metrics_port in ports
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            spec = container[probe]
            port = spec["grpc"]["port"] if "grpc" in spec else spec["httpGet"]["port"]
            assert port == args.port, (deployment["metadata"]["name"], probe)
            if "httpGet" in spec:
                assert spec["httpGet"]["path"] == "/health"
    if args.command == "target":
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_services_point_at_the_ports_their_pods_serve():
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    for deployment, container in containers():
        args = build_parser().parse_args(container["args"])
        name = deployment["metadata"]["name"]
        service = services[name]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert any(p["targetPort"] == args.port for p in service["spec"]["ports"])
        if args.command in ("target", "draft"):
            assert service["spec"]["clusterIP"] == "None", "worker Services must be headless"


def test_addresses_in_flags_name_existing_services_and_ports():
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in by_kind("Service")}
    for _, container in containers():
        args = build_parser().parse_args(container["args"])
        addresses = []
        if args.command == "coordinator":
            addresses = [*args.target, *(args.draft or [])]
        elif args.command == "gateway":
            addresses = [args.coordinator]
        for address in addresses:
            host, port = address.rsplit(":", 1)
            assert int(port) in services[host], address


def test_autoscalers_target_existing_deployments():
    names = {d["metadata"]["name"] for d in by_kind("Deployment")}
    for hpa in by_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in names
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
