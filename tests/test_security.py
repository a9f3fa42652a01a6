"""TLS, mutual TLS, bearer tokens, and no patient data in logs, metrics or errors.

Certificates are generated at test time; no key is ever committed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2

from brainscan import Client, InvalidInput, ServerUnavailable, Unauthenticated
from tests.conftest import health_status, start_gateway, stop_gateway, synthetic_slice
from tests.dicom_factory import dicom_bytes

TOKEN = "s3cret-token-for-tests"
PATIENT_NAME = "Doe^Jane^Confidential"
PATIENT_ID = "PID-7734-XYZ"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key, issuer_name, key, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("brainscan test CA", ca_key, _name("brainscan test CA"), ca_key, ca=True)
    files = {}
    for role, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"brainscan test {role}", ca_key, ca_cert.subject, key, server=server)
        files[f"{role}_cert"] = folder / f"{role}.crt"
        files[f"{role}_key"] = folder / f"{role}.key"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"].write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return Pki(ca=folder / "ca.crt", **files)


@pytest.fixture(scope="module")
def tls_gateway(pki: Pki, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.txt"
    tokens.write_text(f"another-token\n{TOKEN}\n")
    gateway = start_gateway(
        tiny_repository, tmp_path_factory.mktemp("logs"),
        extra=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
               "--auth-token-file", str(tokens), "--metrics-port", "0"],
        credentials=grpc.ssl_channel_credentials(pki.ca.read_bytes()),
    )
    yield gateway
    stop_gateway(gateway)


@pytest.fixture(scope="module")
def mtls_gateway(pki: Pki, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    gateway = start_gateway(
        tiny_repository, tmp_path_factory.mktemp("logs"),
        extra=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)],
        credentials=grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
        ),
    )
    yield gateway
    stop_gateway(gateway)


def test_tls_with_a_valid_token_is_served(tls_gateway, pki):
    with Client(tls_gateway.address, tls_ca=pki.ca, token=TOKEN) as client:
        assert client.analyze(synthetic_slice(96)).label
        assert client.model_info().backend == "embedded"


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_unauthenticated(tls_gateway, pki, token):
    with Client(tls_gateway.address, tls_ca=pki.ca, token=token) as client:
        with pytest.raises(Unauthenticated, match="bearer token"):
            client.analyze(synthetic_slice(96))


def test_health_stays_open_without_a_token(tls_gateway, pki):
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    assert health_status(tls_gateway.address, credentials=credentials) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_talk_to_a_tls_gateway(tls_gateway):
    with Client(tls_gateway.address, token=TOKEN, timeout_s=5) as client:
        with pytest.raises(ServerUnavailable):
            client.analyze(synthetic_slice(96))


def test_mutual_tls_requires_a_client_certificate(mtls_gateway, pki):
    with Client(mtls_gateway.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as client:
        assert client.analyze(synthetic_slice(96)).label
    with Client(mtls_gateway.address, tls_ca=pki.ca, timeout_s=5) as client:
        with pytest.raises(ServerUnavailable):
            client.analyze(synthetic_slice(96))


def _dicom_with_patient(pixels: np.ndarray | None) -> bytes:
    import io

    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels, spacing=(0.9, 0.9), patient_name=PATIENT_NAME)))
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = "19700101"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_patient_data_never_leaves_the_request(tls_gateway, pki):
    good = _dicom_with_patient(synthetic_slice(128).astype(np.uint16) * 64)
    no_pixels = _dicom_with_patient(None)
    corrupt = good[: len(good) - 5000]
    errors = []
    with Client(tls_gateway.address, tls_ca=pki.ca, token=TOKEN) as client:
        result = client.analyze(good, gate=False)
        assert PATIENT_NAME not in repr(result)
        for bad in (no_pixels, corrupt):
            with pytest.raises(InvalidInput) as caught:
                client.analyze(bad)
            errors.append(str(caught.value))
        streamed = list(client.analyze_many([good]))
        assert len(streamed) == 1
    metrics_port = int(tls_gateway.log().split("metrics on :")[1].split("/")[0])
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for secret in (PATIENT_NAME, "Doe", "Confidential", PATIENT_ID, "19700101"):
        for where, text in (("log", tls_gateway.log()), ("metrics", metrics), ("errors", " ".join(errors))):
            assert secret not in text, f"{secret!r} leaked into the {where}"
