"""docker/kubernetes/: every object validated against the Kubernetes API schemas (kubernetes-validate,
strict: unknown fields are errors), then the cross-references no schema sees checked statically
(selectors, ports, probes, Secrets and volumes, settings the gateway knows), and a real gateway run
with the manifest's settings and probed the way the kubelet probes it. No cluster here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2

from gateway.config import DNS_SCHEME, SETTINGS, triton_targets
from gateway.server import LIVENESS_SERVICE
from tests.conftest import health_status, start_gateway, stop_gateway

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = PROJECT_ROOT / "docker" / "kubernetes"
# the oldest release whose native gRPC probes are GA, and the newest schemas the validator ships
VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]
NOT_APPLIED = {"kustomization.yaml", "models-loader.yaml"}  # kustomize's own file; a one-off pod


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) → object, over the files kustomization.yaml applies."""
    found = {}
    for name in load(KUBERNETES / "kustomization.yaml")[0]["resources"]:
        for doc in load(KUBERNETES / name):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment)["env"]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_object_is_valid_for_kubernetes(path: Path, version: str) -> None:
    docs = load(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        if doc["kind"] == "Kustomization":
            continue  # not an API object; its contents are checked below
        kubernetes_validate.validate(doc, version, strict=True)  # raises naming the field


def test_kustomization_applies_every_manifest_in_one_namespace() -> None:
    listed = set(load(KUBERNETES / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - NOT_APPLIED
    namespaces = {
        doc["metadata"].get("namespace") for p in KUBERNETES.glob("*.yaml") for doc in load(p) if "metadata" in doc
    }
    assert namespaces - {None} == {"brainscan"} and ("Namespace", "brainscan") in objects()


def test_selectors_services_and_budgets_find_their_pods() -> None:
    found = objects()
    for name in ("triton", "gateway"):
        deployment = found[("Deployment", name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        service = found[("Service", name)]
        assert service["spec"]["clusterIP"] == "None", f"{name}: headless, so clients balance over pods themselves"
        assert service["spec"]["selector"].items() <= labels.items()
        named_ports = {p["name"] for p in container(deployment)["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named_ports
        assert found[("PodDisruptionBudget", name)]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = found[("HorizontalPodAutoscaler", "gateway")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["minReplicas"] > found[("PodDisruptionBudget", "gateway")]["spec"]["minAvailable"]


def test_triton_serves_the_mounted_repository_on_a_gpu_with_grpc_probes() -> None:
    found = objects()
    triton = container(found[("Deployment", "triton")])
    compose = yaml.safe_load((PROJECT_ROOT / "docker" / "compose.yaml").read_text())
    assert triton["image"] == compose["services"]["triton"]["image"], "one Triton version for compose and Kubernetes"
    mounts = {m["name"]: m for m in triton["volumeMounts"]}
    assert f"--model-repository={mounts['models']['mountPath']}" in triton["args"] and mounts["models"]["readOnly"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == triton["resources"]["requests"]["nvidia.com/gpu"] == 1
    grpc_port = next(p["containerPort"] for p in triton["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert triton[probe]["grpc"]["port"] == grpc_port, probe
    claim = {v["name"]: v for v in found[("Deployment", "triton")]["spec"]["template"]["spec"]["volumes"]}
    assert ("PersistentVolumeClaim", claim["models"]["persistentVolumeClaim"]["claimName"]) in found


def test_gateway_settings_probes_and_secrets_agree() -> None:
    found = objects()
    deployment = found[("Deployment", "gateway")]
    gateway, settings = container(deployment), env(deployment)
    unknown = set(settings) - set(SETTINGS.values())
    assert not unknown, f"the gateway has no such setting: {sorted(unknown)}"

    # Triton through its headless Service, every pod: dns:///triton.<namespace>.svc...:<grpc port>
    [target] = triton_targets(settings["BRAINSCAN_TRITON_URL"])
    host, port = target.removeprefix(DNS_SCHEME).rsplit(":", 1)
    assert target.startswith(DNS_SCHEME) and host.split(".")[:3] == ["triton", "brainscan", "svc"]
    assert int(port) in {p["port"] for p in found[("Service", "triton")]["spec"]["ports"]}

    # kubelet probes the plaintext health port: readiness "" follows Triton, liveness does not
    health = int(settings["BRAINSCAN_HEALTH_PORT"])
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["health"] == health and ports["grpc"] == int(settings["BRAINSCAN_PORT"])
    assert ports["metrics"] == int(settings["BRAINSCAN_METRICS_PORT"])
    assert gateway["readinessProbe"]["grpc"] == {"port": health}
    for probe in ("startupProbe", "livenessProbe"):
        assert gateway[probe]["grpc"] == {"port": health, "service": LIVENESS_SERVICE}, probe

    # TLS and tokens come from mounted Secrets, and the settings point into those mounts
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    assert all(m.get("readOnly") for name, m in mounts.items() if name != "tmp")
    for setting, volume in (("BRAINSCAN_TLS_CERT", "tls"), ("BRAINSCAN_TLS_KEY", "tls"),
                            ("BRAINSCAN_AUTH_TOKEN_FILE", "auth"), ("BRAINSCAN_MODEL_REPOSITORY", "models")):
        assert settings[setting].startswith(mounts[volume]["mountPath"]), setting
    assert volumes["tls"]["secret"]["secretName"] == "brainscan-tls"
    assert Path(settings["BRAINSCAN_TLS_KEY"]).name == "tls.key"  # the keys of a kubernetes.io/tls Secret
    assert [i["path"] for i in volumes["auth"]["secret"]["items"]] == [Path(settings["BRAINSCAN_AUTH_TOKEN_FILE"]).name]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(settings["BRAINSCAN_GRACE_PERIOD_S"]) + 5, "preStop sleep + drain must fit the grace period"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and its key, as `kubectl create secret tls` would mount them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "brainscan gateway")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "tls.crt", folder / "tls.key"


def test_a_gateway_with_the_manifests_settings_answers_the_kubelets_plaintext_probes(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """TLS on the service port, health alone in plaintext on the probe port; the Triton backend aside
    (embedded here: no Triton in this test), every other setting as the manifest has it."""
    settings = env(objects()[("Deployment", "gateway")])
    cert, key = self_signed(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token\n")
    settings.update({
        "BRAINSCAN_BACKEND": "embedded", "BRAINSCAN_TLS_CERT": str(cert), "BRAINSCAN_TLS_KEY": str(key),
        "BRAINSCAN_AUTH_TOKEN_FILE": str(tokens), "BRAINSCAN_HEALTH_PORT": "0", "BRAINSCAN_METRICS_PORT": "0",
    })  # fmt: skip
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    gateway = start_gateway(tiny_repository, tmp_path, env=settings, credentials=credentials)
    try:
        probe_port = gateway.log().split("plaintext health on :")[1].split()[0].rstrip(")")
        probes = f"127.0.0.1:{probe_port}"
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health_status(probes) == serving and health_status(probes, LIVENESS_SERVICE) == serving
        assert health_status(gateway.address) is None, "the service port must not answer plaintext"
        assert health_status(gateway.address, credentials=credentials) == serving
    finally:
        stop_gateway(gateway)
