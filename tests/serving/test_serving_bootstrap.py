"""The shared server bootstrap, exercised on real servers over real channels (port 0)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import echo_service
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from esper.serving import (
    ChannelConfig,
    GrpcServer,
    RetryPolicy,
    ServerConfig,
    ServerProcess,
    error_info_from,
    open_aio_channel,
    open_sync_channel,
    parse_listening_line,
    stream_call,
    unary_call,
    unary_call_sync,
    wait_for_serving,
)

pytestmark = pytest.mark.integration
ECHO_SCRIPT = Path(echo_service.__file__)


async def _started(config: ServerConfig | None = None, *, serving: bool = True) -> GrpcServer:
    server = GrpcServer(config)
    echo_service.add_echo(server)
    await server.start()
    if serving:
        await server.set_serving()
    return server


def test_binds_loopback_port0_and_health_not_serving_until_ready():
    async def scenario():
        server = await _started(serving=False)
        try:
            assert server.address.startswith("127.0.0.1:") and server.port > 0
            async with open_aio_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", echo_service.SERVICE):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
                await server.set_serving()
                await wait_for_serving(channel, timeout=5, service=echo_service.SERVICE)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_reflection_lists_services():
    async def scenario():
        server = await _started()
        try:
            channel = grpc.insecure_channel(server.address)
            try:
                names = await asyncio.to_thread(ProtoReflectionDescriptorDatabase(channel).get_services)
            finally:
                channel.close()
            assert echo_service.SERVICE in names
            assert "grpc.health.v1.Health" in names
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_domain_errors_map_to_status_with_error_info_and_server_keeps_serving():
    async def scenario():
        server = await _started()
        try:
            async with open_aio_channel(server.address) as channel:
                fail = echo_service.method(channel, "Fail")
                cases = {b"invalid": grpc.StatusCode.INVALID_ARGUMENT, b"notfound": grpc.StatusCode.NOT_FOUND,
                         b"dataloss": grpc.StatusCode.DATA_LOSS, b"boom": grpc.StatusCode.INTERNAL,
                         b"abort": grpc.StatusCode.PERMISSION_DENIED}
                for payload, code in cases.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await fail(payload, timeout=5)
                    assert info.value.code() == code, payload
                    # the server is still up after every failure
                    assert await echo_service.method(channel, "Echo")(b"ping", timeout=5) == b"ping"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await fail(b"invalid", timeout=5)
                assert "payload must be 'ok'" in info.value.details()
                error = error_info_from(info.value)
                assert error is not None
                assert (error.reason, error.domain, error.metadata["field"]) == (
                    "INVALID_ARGUMENT", "esper.v1", "payload")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await fail(b"boom", timeout=5)
                assert "RuntimeError" in info.value.details() and "error id" in info.value.details()
                assert error_info_from(info.value).reason == "INTERNAL"
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_stream_handler_error_after_chunks_is_internal_and_stream_ok_otherwise():
    async def scenario():
        server = await _started()
        try:
            async with open_aio_channel(server.address) as channel:
                stream = echo_service.method(channel, "Stream", "unary_stream")
                got = [c async for c in stream_call(stream, b"3", timeout=5)]
                assert got == [b"chunk0", b"chunk1", b"chunk2"]
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for c in stream_call(stream, b"2!", timeout=5):
                        got.append(c)
                assert got == [b"chunk0", b"chunk1"]
                assert info.value.code() == grpc.StatusCode.INTERNAL
                collect = echo_service.method(channel, "Collect", "stream_unary")
                assert await collect(iter([b"ab", b"cde"]), timeout=5) == b"5"
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_max_message_size_is_enforced():
    async def scenario():
        server = await _started(ServerConfig(max_message_bytes=64 * 1024))
        try:
            config = ChannelConfig(server.address, max_message_bytes=1024 * 1024)
            async with open_aio_channel(config) as channel:
                echo = echo_service.method(channel, "Echo")
                assert len(await echo(b"x" * 60_000, timeout=5)) == 60_000
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await echo(b"x" * 100_000, timeout=5)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert await echo(b"still up", timeout=5) == b"still up"
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_bearer_token_auth():
    async def scenario():
        server = await _started(ServerConfig(auth_token="s3cret"))
        try:
            async with open_aio_channel(server.address) as anonymous:
                # health stays open for supervisors
                await wait_for_serving(anonymous, timeout=5)
                for call in (echo_service.method(anonymous, "Echo")(b"hi", timeout=5),
                             echo_service.method(anonymous, "Echo")(b"hi", timeout=5,
                                                                    metadata=(("authorization", "Bearer nope"),))):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in echo_service.method(anonymous, "Stream", "unary_stream")(b"2", timeout=5):
                        pass
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with open_aio_channel(ChannelConfig(server.address, auth_token="s3cret")) as channel:
                assert await echo_service.method(channel, "Echo")(b"hi", timeout=5) == b"hi"
                got = [c async for c in echo_service.method(channel, "Stream", "unary_stream")(b"2", timeout=5)]
                assert len(got) == 2
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    # the blocking channel helper sends the token too
    async def sync_scenario():
        server = await _started(ServerConfig(auth_token="tok"))
        try:
            def calls():
                with open_sync_channel(ChannelConfig(server.address, auth_token="tok")) as ch:
                    return unary_call_sync(echo_service.method(ch, "Echo"), b"x", timeout=5, idempotent=True)
            assert await asyncio.to_thread(calls) == b"x"
        finally:
            await server.stop(0)

    asyncio.run(sync_scenario())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make a test certificate")
def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)

    async def scenario():
        server = await _started(ServerConfig(tls_cert_file=cert, tls_key_file=key))
        try:
            async with open_aio_channel(ChannelConfig(server.address, tls_root_cert=cert)) as channel:
                assert await echo_service.method(channel, "Echo")(b"tls", timeout=5) == b"tls"
            async with open_aio_channel(server.address) as plaintext:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await echo_service.method(plaintext, "Echo")(b"tls", timeout=2)
                assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_client_deadline_is_mandatory_and_retries_only_idempotent_calls():
    async def scenario():
        server = await _started()
        try:
            async with open_aio_channel(server.address) as channel:
                flaky = echo_service.method(channel, "Flaky")
                for bad in (None, 0, -1):
                    with pytest.raises(ValueError, match="deadline"):
                        await unary_call(flaky, b"a:0", timeout=bad, idempotent=True)
                policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01)
                # idempotent: two UNAVAILABLE then success on the third attempt
                assert await unary_call(flaky, b"idem:2", timeout=5, idempotent=True, retry=policy) == b"3"
                # not idempotent: the first failure is final
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unary_call(flaky, b"once:2", timeout=5, idempotent=False, retry=policy)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                # exactly one attempt was made: the next attempt on that key is number 2
                assert await unary_call(flaky, b"once:0", timeout=5, idempotent=False) == b"2"
                # attempts are bounded
                with pytest.raises(grpc.aio.AioRpcError):
                    await unary_call(flaky, b"many:10", timeout=5, idempotent=True, retry=policy)
                # a non-retryable code is not retried
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unary_call(echo_service.method(channel, "Fail"), b"invalid", timeout=5,
                                     idempotent=True, retry=policy)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                # the deadline covers the call
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unary_call(echo_service.method(channel, "Slow"), b"2", timeout=0.2, idempotent=True)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                # attempts actually made: 'many' was tried exactly max_attempts times
                assert await unary_call(flaky, b"many:0", timeout=5, idempotent=False) == b"5"
                # a stream-unary request given as a list is sent again, whole, on each attempt
                collect = echo_service.method(channel, "FlakyCollect", "stream_unary")
                assert await unary_call(collect, [b"s:2", b"abcd"], timeout=5, idempotent=True, retry=policy) == b"7"
        finally:
            await server.stop(0)

    asyncio.run(scenario())

    async def sync_scenario():
        server = await _started()
        try:
            def calls():
                with open_sync_channel(server.address) as ch:
                    collect = echo_service.method(ch, "FlakyCollect", "stream_unary")
                    return unary_call_sync(collect, [b"sync:1", b"xy"], timeout=5, idempotent=True,
                                           retry=RetryPolicy(initial_backoff_s=0.01))
            assert await asyncio.to_thread(calls) == b"8"
        finally:
            await server.stop(0)

    asyncio.run(sync_scenario())


def test_parse_listening_line():
    assert parse_listening_line("LISTENING 127.0.0.1:5123\n") == "127.0.0.1:5123"
    for bad in ("listening on 5", "LISTENING 127.0.0.1", "LISTENING :80", "hello"):
        with pytest.raises(ValueError, match="expected"):
            parse_listening_line(bad)


def test_server_config_rejects_bad_settings():
    for kwargs, text in (({"port": 70000}, "port"), ({"grace_seconds": -1}, "grace"),
                         ({"tls_cert_file": Path("c.pem")}, "TLS"), ({"max_message_bytes": 10}, "max_message")):
        with pytest.raises(ValueError, match=text):
            ServerConfig(**kwargs).validate()


def _wait_for_text(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_process_sigterm_finishes_in_flight_call_then_exits_cleanly(tmp_path):
    proc = ServerProcess([sys.executable, str(ECHO_SCRIPT), "--port", "0", "--grace", "5"],
                         stderr_path=tmp_path / "stderr.log")
    address = proc.start()
    try:
        assert address.startswith("127.0.0.1:")
        with open_sync_channel(address) as channel:
            slow = echo_service.method(channel, "Slow")
            result: dict[str, object] = {}

            def call():
                try:
                    result["value"] = slow(b"1.0", timeout=10)
                except grpc.RpcError as err:
                    result["error"] = err

            worker = threading.Thread(target=call)
            worker.start()
            _wait_for_text(tmp_path / "stderr.log", "slow call started")
            started = time.monotonic()
            proc.process.send_signal(signal.SIGTERM)
            worker.join(10)
            assert result.get("value") == b"done", result
            assert proc.process.wait(10) == 0
            assert time.monotonic() - started < 8
    finally:
        proc.stop()
    assert "received SIGTERM" in (tmp_path / "stderr.log").read_text()


def test_process_grace_period_cancels_calls_that_take_too_long(tmp_path):
    proc = ServerProcess([sys.executable, str(ECHO_SCRIPT), "--port", "0", "--grace", "0.5"],
                         stderr_path=tmp_path / "stderr.log")
    with proc, open_sync_channel(proc.address) as channel:
        future = echo_service.method(channel, "Slow").future(b"30", timeout=20)
        _wait_for_text(tmp_path / "stderr.log", "slow call started")
        started = time.monotonic()
        proc.process.send_signal(signal.SIGINT)
        with pytest.raises(grpc.RpcError):
            future.result(timeout=10)
        assert proc.process.wait(10) == 0
        assert time.monotonic() - started < 5


def test_sigterm_during_a_slow_setup_exits_cleanly_without_binding():
    proc = subprocess.Popen([sys.executable, str(ECHO_SCRIPT), "--port", "0", "--setup-delay", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stderr.readline()  # setup runs after the signal handlers are installed
    assert b"setup started" in first, first
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, rest = proc.communicate(timeout=20)
    err = first + rest
    assert proc.returncode == 0, err.decode()
    assert b"LISTENING" not in out
    assert b"while starting" in err
    assert time.monotonic() - started < 15
