"""TLS, mutual TLS, bearer tokens, message limits and reflection on real servers on loopback."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.server import CoordinatorConfig, start_coordinator
from draft_worker.server import start_draft
from splitspec.errors import Unavailable
from splitspec.paged.cache import CacheConfig
from splitspec.security import TLSConfig
from splitspec.service import make_channel
from splitspec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, target_pb2_grpc
from target_worker.server import start_target

R = coordinator_pb2.GenerateRequest
TOKEN = "s3cret"


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, name: str) -> tuple[bytes, bytes]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@pytest.fixture(scope="module")
def pki():
    ca, other_ca = make_ca("splitspec test CA"), make_ca("some other CA")
    ca_pem = ca[1].public_bytes(serialization.Encoding.PEM)
    server_cert, server_key = issue(ca, "worker")
    client_cert, client_key = issue(ca, "coordinator")
    rogue_cert, rogue_key = issue(other_ca, "rogue worker")
    user_cert, user_key = issue(ca, "a client")
    return {
        "server_mtls": TLSConfig(server_cert, server_key, ca_pem, require_client_cert=True),
        "coordinator": TLSConfig(client_cert, client_key, ca_pem, require_client_cert=True),
        "client": TLSConfig(user_cert, user_key, ca_pem),
        "client_ca_only": TLSConfig(ca=ca_pem),
        "rogue": TLSConfig(rogue_cert, rogue_key, ca_pem, require_client_cert=True),
    }


@pytest.fixture(scope="module")
async def secure_stack(tiny, pki):
    target = await start_target(tiny["target"], cache=CacheConfig(num_blocks=256), tls=pki["server_mtls"])
    draft = await start_draft(tiny["draft_noisy"], cache=CacheConfig(num_blocks=256), tls=pki["server_mtls"])
    coordinator = await start_coordinator(CoordinatorConfig(
        target=f"localhost:{target.port}", draft=f"localhost:{draft.port}", port=0, host="127.0.0.1",
        connect_timeout=10, tls=pki["coordinator"], auth_token=TOKEN))
    yield target, draft, coordinator
    await coordinator.stop(0)
    await draft.stop(0)
    await target.stop(0)


async def generate(channel) -> list[int]:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    return [t async for r in stub.Generate(R(prompt="secure", max_tokens=12, temperature=0.0), timeout=30)
            for t in r.token_ids]


async def test_happy_path_with_mtls_on_every_hop(secure_stack, pki):
    """client -mTLS-> coordinator -mTLS-> target and draft, every peer verified against the CA."""
    _, _, coordinator = secure_stack
    async with make_channel(f"localhost:{coordinator.port}", pki["client"], TOKEN) as channel:
        assert len(await generate(channel)) == 12
    async with make_channel(f"localhost:{coordinator.port}", pki["client_ca_only"], TOKEN) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:  # no client certificate: refused
            await generate(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
async def test_missing_or_wrong_token_is_unauthenticated(secure_stack, pki, token):
    _, _, coordinator = secure_stack
    async with make_channel(f"localhost:{coordinator.port}", pki["client"], token) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(channel)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # probes need no token

        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_client_without_the_ca_is_rejected(secure_stack):
    _, _, coordinator = secure_stack
    for channel in (make_channel(f"localhost:{coordinator.port}", None, TOKEN),       # plaintext to a TLS port
                    make_channel(f"localhost:{coordinator.port}", TLSConfig(), TOKEN)):  # system roots only
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_worker_refuses_a_client_without_a_certificate(secure_stack, pki):
    target, _, _ = secure_stack
    async with make_channel(f"localhost:{target.port}", pki["client_ca_only"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await target_pb2_grpc.TargetWorkerStub(channel).GetModelInfo(common_pb2.ModelInfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_worker_with_a_certificate_from_another_ca_is_not_used(tiny, pki):
    rogue = await start_target(tiny["target"], cache=CacheConfig(num_blocks=64), tls=pki["rogue"])
    try:
        with pytest.raises(Unavailable, match="no target worker is serving"):
            await start_coordinator(CoordinatorConfig(target=f"localhost:{rogue.port}", port=0, host="127.0.0.1",
                                                      connect_timeout=2, tls=pki["coordinator"]))
    finally:
        await rogue.stop(0)


async def test_oversized_message_is_resource_exhausted(secure_stack, pki):
    _, _, coordinator = secure_stack
    async with make_channel(f"localhost:{coordinator.port}", pki["client"], TOKEN) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(R(prompt="x" * (5 << 20)), timeout=30):
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_reflection_only_when_asked(tiny):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def services(server) -> list[str] | grpc.StatusCode:
        async with make_channel(server.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            try:
                async for reply in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                        list_services="")]), timeout=5):
                    return [s.name for s in reply.list_services_response.service]
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    plain = await start_target(tiny["target"], cache=CacheConfig(num_blocks=64))
    reflective = await start_target(tiny["target"], cache=CacheConfig(num_blocks=64), reflection=True)
    try:
        assert await services(plain) == grpc.StatusCode.UNIMPLEMENTED
        assert "splitspec.v1.TargetWorker" in await services(reflective)
    finally:
        await plain.stop(0)
        await reflective.stop(0)
