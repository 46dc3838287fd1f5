"""TLS where it is configured: the control plane (uvicorn) and the inference service (gRPC) serve it
from certificate and key files, the S3 client verifies the store against a configured CA bundle, and
presigned URLs take the public endpoint's scheme. The certificate is self-signed, made in the test."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import pytest

from services.common.settings import InferenceSettings
from services.common.store import LocalStore, StoreError
from services.inference.gen import inference_pb2 as pb
from services.inference.gen import inference_pb2_grpc as pb_grpc
from services.inference.testing import ServerThread
from tests.s3_fixtures import free_port

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tls-test-token"
TABLE = f"ops:admin:{hashlib.sha256(TOKEN.encode()).hexdigest()}"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "huvidpo-test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return d / "cert.pem", d / "key.pem"


def test_controlplane_serves_https_from_the_configured_files(cert: tuple[Path, Path], tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HUVIDPO_STORE_ROOT": str(tmp_path / "store"),
        "HUVIDPO_CONTROLPLANE_HOST": "127.0.0.1",
        "HUVIDPO_CONTROLPLANE_PORT": str(port),
        "HUVIDPO_CONTROLPLANE_WORK_DIR": str(tmp_path / "work"),
        "HUVIDPO_CONTROLPLANE_TLS_CERTFILE": str(cert[0]),
        "HUVIDPO_CONTROLPLANE_TLS_KEYFILE": str(cert[1]),
        "HUVIDPO_TOKENS": TABLE,
    }
    log = (tmp_path / "cp.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.controlplane"], env=env, stdout=log, stderr=log)
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(url + "/healthz", verify=str(cert[0]), timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "cp.log").read_text()) from None
                time.sleep(0.2)
        assert r.status_code == 200
        who = httpx.get(url + "/v1/whoami", verify=str(cert[0]), headers={"Authorization": f"Bearer {TOKEN}"})
        assert who.json()["name"] == "ops"
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # and the certificate is checked by a client without it
            httpx.get(url + "/healthz", timeout=5)
    finally:
        proc.terminate()
        proc.wait(30)


def test_inference_serves_grpc_over_tls_with_the_token(
    cert: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = InferenceSettings(
        port=0,
        metrics_port=0,
        base_model=str(tiny_model_dir),
        cache_dir=tmp_path / "cache",
        tokens=[TABLE],
        tls_certfile=cert[0],
        tls_keyfile=cert[1],
    )
    srv = ServerThread(settings, LocalStore(tmp_path / "store")).start(wait_ready=False)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes())
        meta = [("authorization", f"Bearer {TOKEN}")]
        with grpc.secure_channel(srv.address, creds) as ch:
            stub = pb_grpc.VideoGenerationServiceStub(ch)
            stub.ListModels(pb.ListModelsRequest(), metadata=meta, timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(pb.ListModelsRequest(), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(srv.address) as ch:  # plaintext does not get through
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.VideoGenerationServiceStub(ch).ListModels(
                    pb.ListModelsRequest(), metadata=meta, timeout=10
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


@pytest.fixture
def https_s3(cert: tuple[Path, Path]) -> Iterator[str]:
    """An HTTPS endpoint with the test certificate that answers every request like S3 does for a
    missing key (404, no body): enough for the client's TLS handshake and one ``stat``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_s3_client_verifies_the_store_with_the_configured_ca(https_s3: str, cert: tuple[Path, Path]) -> None:
    from services.common.store.s3 import MinioStore

    trusted = MinioStore(https_s3, "ak", "sk", create_bucket=False, retries=0, ca_bundle=str(cert[0]))
    assert trusted.stat("some/key") is None  # the handshake passed: the 404 came back
    untrusted = MinioStore(https_s3, "ak", "sk", create_bucket=False, retries=0, timeout=5)
    with pytest.raises(StoreError):  # the public roots do not know the test CA
        untrusted.stat("some/key")


def test_presigned_urls_take_the_public_endpoints_scheme() -> None:
    from services.common.store.s3 import MinioStore

    store = MinioStore("127.0.0.1:9000", "ak", "sk", public_endpoint="https://s3.example.test")
    assert store.presigned_get_url("datasets/x", timedelta(minutes=5)).startswith("https://s3.example.test/")
    plain = MinioStore("127.0.0.1:9000", "ak", "sk")
    assert plain.presigned_get_url("datasets/x", timedelta(minutes=5)).startswith("http://127.0.0.1:9000/")
