"""TLS, mutual TLS and bearer tokens, over real servers: refusals, rotation, exposure, no leaks.

Certificates come from tests/certs.py, generated per test into tmp_path.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pipecat.frames.frames import BotStoppedSpeakingFrame, ErrorFrame, Frame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.workers.runner import WorkerRunner
from pydantic import ValidationError

from bots.pipeline import BotConfig, build_worker
from bots.turn_settings import TurnSettings
from bots.wav_transport import WavFileTransport
from clients.channel import open_channel
from clients.security import (
    ClientSecurity,
    ClientSecurityError,
    add_security_flags,
    diagnose,
    security_from_args,
    speaks_tls,
)
from clients.serving import wait_serving
from clients.targets import Targets
from nemotron.speech.v1 import info_pb2, info_pb2_grpc
from nemotron_speech.probe import probe
from nemotron_speech.up import add_up_parser, security_env
from services import serve
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.auth import AcceptedTokens
from services.runtime.server import MeshServer
from services.runtime.settings import add_settings_flags
from services.runtime.tls import is_loopback
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.certs import Pki, make_ca, make_leaf, make_pki, write_cert, write_key
from tests.doubles import CountingAsrBackendDouble, ScriptedLlmBackendDouble, ToneTtsBackendDouble
from tests.servers import ROOT, running, start_serve_double
from tests.speech import speech_pcm

SECURITY_VARIABLES = [
    "NEMOTRON_TLS",
    "NEMOTRON_TLS_CA",
    "NEMOTRON_TLS_CLIENT_CERT",
    "NEMOTRON_TLS_CLIENT_KEY",
    "NEMOTRON_TLS_SERVER_NAME",
    "NEMOTRON_TOKEN",
    "NEMOTRON_TOKEN_FILE",
    "NEMOTRON_TOKENS",
    "NEMOTRON_TLS_CERT",
    "NEMOTRON_TLS_KEY",
    "NEMOTRON_TLS_CLIENT_CA",
    "NEMOTRON_INSECURE",
    *(f"NEMOTRON_{s}_{f}" for s in ("ASR", "TTS", "LLM") for f in ("HOST", "TOKENS", "INSECURE")),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests say what they want; a developer's own NEMOTRON_TLS_* must not leak in."""
    for name in SECURITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
def token() -> str:
    return "tok-" + secrets.token_urlsafe(24)


@pytest.fixture
def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# accepted tokens\n{token}\n")
    return path


def tts_settings(**security: object) -> TtsSettings:
    return TtsSettings(port=0, max_streams=4, shutdown_grace_s=0, **security)  # type: ignore[arg-type]


@asynccontextmanager
async def tts_server(**security: object) -> AsyncIterator[MeshServer]:
    service = TtsService(tts_settings(**security), ToneTtsBackendDouble())
    async with running(service) as server:
        yield server


def target(server: MeshServer) -> str:
    return f"127.0.0.1:{server.port}"


async def server_info(server: MeshServer, security: ClientSecurity) -> info_pb2.ServerInfo:
    async with open_channel(target(server), security) as channel:
        stub = info_pb2_grpc.ServerInfoServiceStub(channel)
        return await stub.GetServerInfo(info_pb2.GetServerInfoRequest(), timeout=5)


async def refusal(server: MeshServer, security: ClientSecurity) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server_info(server, security)
    return caught.value


def secured(pki: Pki, token_file: Path, mutual: bool = True) -> dict[str, object]:
    return {
        "tls_cert": str(pki.server_cert),
        "tls_key": str(pki.server_key),
        "tls_client_ca": str(pki.ca) if mutual else "",
        "token_file": str(token_file),
    }


def client(pki: Pki, token: str = "", mutual: bool = True) -> ClientSecurity:
    if not mutual:
        return ClientSecurity(ca=pki.ca, token=token)
    return ClientSecurity(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, token=token)


# ---- tokens -------------------------------------------------------------------------------------


async def test_no_token_and_a_wrong_token_are_unauthenticated_and_logged_without_it(
    pki, token, token_file, caplog
):
    caplog.set_level(logging.DEBUG)
    wrong = "tok-" + secrets.token_urlsafe(24)
    async with tts_server(**secured(pki, token_file)) as server:
        missing = await refusal(server, client(pki))
        refused = await refusal(server, client(pki, wrong))
        info = await server_info(server, client(pki, token))

    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in missing.details()
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.details() == "the bearer token was not accepted"
    assert info.backend == "double"
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == 2
    assert all("ServerInfoService/GetServerInfo from ipv4:127.0.0.1:" in r for r in refusals)
    assert "not accepted" in refusals[1]
    everything = caplog.text + repr(missing) + repr(refused) + refused.debug_error_string()
    assert token not in everything and wrong not in everything


async def test_a_token_without_tls_goes_to_loopback_only_over_local_credentials(token):
    async with tts_server(tokens=token, host="0.0.0.0", insecure=True) as server:
        assert (await server_info(server, ClientSecurity(token=token))).backend == "double"
        refused = await refusal(server, ClientSecurity())
        address = network_address()
        if address is None:
            pytest.skip("this machine has no non-loopback address")
        # The same server through a network address: gRPC's local credentials do not connect.
        async with open_channel(f"{address}:{server.port}", ClientSecurity(token=token)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await info_pb2_grpc.ServerInfoServiceStub(ch).GetServerInfo(
                    info_pb2.GetServerInfoRequest(), timeout=5
                )
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "loopback" in caught.value.details()


def network_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if is_loopback(address) else address


async def test_several_tokens_and_the_token_file_rotates_without_a_restart(tmp_path, token):
    old, new, from_env = ("tok-" + secrets.token_urlsafe(16) for _ in range(3))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{old}\n")
    async with tts_server(token_file=str(tokens), tokens=from_env) as server:
        for accepted in (old, from_env):
            await server_info(server, ClientSecurity(token=accepted))
        tokens.write_text(f"{old}\n{new}\n")  # hand out the new one
        await server_info(server, ClientSecurity(token=new))
        await server_info(server, ClientSecurity(token=old))
        tokens.write_text(f"{new}\n")  # withdraw the old one
        refused = await refusal(server, ClientSecurity(token=old))
        await server_info(server, ClientSecurity(token=new))
        tokens.write_text("")  # an empty file (a rotation half-written) keeps the last tokens
        await server_info(server, ClientSecurity(token=new))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_compare_in_constant_time_over_every_accepted_token(monkeypatch):
    accepted = AcceptedTokens(tokens=["alpha", "beta", "gamma"])
    assert accepted.accepts("beta") and accepted.accepts("alpha")
    assert not accepted.accepts("alph") and not accepted.accepts("") and not accepted.accepts("x")
    # Every check compares equal-length digests with compare_digest against every accepted
    # token, a match first or none at all: its time says nothing about the guess.
    import hmac

    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for guess in ("alpha", "nope", "a much longer guess than any token"):
        compared.clear()
        accepted.accepts(guess)
        assert compared == [(32, 32)] * 3, guess


@pytest.mark.parametrize(("open_health", "open_reflection"), [(True, False), (False, True)])
async def test_health_and_reflection_are_open_or_closed_by_flag(
    token, open_health, open_reflection
):
    async with (
        tts_server(tokens=token, open_health=open_health, open_reflection=open_reflection) as s,
        # Unbalanced: a balanced channel checks health itself before any call goes out.
        open_channel(target(s), ClientSecurity(), balanced=False) as channel,
    ):
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        health = await outcome(check)
        reflection = await outcome(reflect(channel))
    assert health == ("open" if open_health else "closed")
    assert reflection == ("open" if open_reflection else "closed")


async def test_a_balanced_client_without_a_token_is_told_that_closed_health_needs_one(token):
    async with tts_server(tokens=token, open_health=False) as server:
        error = await refusal(server, ClientSecurity())
        why = await diagnose(error, target(server), ClientSecurity())
        assert await server_info(server, ClientSecurity(token=token))  # its health checks pass
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "needs a token even for health" in why and "NEMOTRON_TOKEN_FILE" in why


async def outcome(awaitable: Awaitable[object]) -> str:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        return "closed"
    return "open"


async def reflect(channel: grpc.aio.Channel) -> list[reflection_pb2.ServerReflectionResponse]:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]


# ---- TLS and mutual TLS -------------------------------------------------------------------------


async def test_mutual_tls_refuses_a_client_certificate_from_another_ca_at_the_handshake(
    pki, token, token_file
):
    stranger = ClientSecurity(
        ca=pki.ca, cert=pki.other_client_cert, key=pki.other_client_key, token=token
    )
    async with tts_server(**secured(pki, token_file)) as server:
        refused = await refusal(server, stranger)
        anonymous = await refusal(server, client(pki, token, mutual=False))
        hint = await diagnose(refused, target(server), stranger)
        assert (await server_info(server, client(pki, token))).backend == "double"
    for error in (refused, anonymous):
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # no call got past the handshake
    assert "may not trust this client's certificate" in hint


async def test_a_client_that_does_not_trust_the_server_certificate_is_refused(pki, token_file):
    async with tts_server(**secured(pki, token_file, mutual=False)) as server:
        error = await refusal(server, ClientSecurity(ca=pki.other_ca))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in error.details()


async def test_a_plaintext_client_to_a_tls_server_is_unavailable_and_told_why(pki, token_file):
    plaintext = ClientSecurity()
    async with tts_server(**secured(pki, token_file, mutual=False)) as server:
        error = await refusal(server, plaintext)
        why = await diagnose(error, target(server), plaintext)
        status = await probe("tts", target(server), 2.0, plaintext)
        with pytest.raises(TimeoutError) as waited:
            await wait_serving(target(server), timeout_s=1.0, security=plaintext)
        assert await speaks_tls(target(server))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "speaks TLS and this client plaintext" in why and "NEMOTRON_TLS_CA" in why
    assert status.health == "DOWN" and "speaks TLS" in status.error
    assert "speaks TLS" in str(waited.value)


async def test_a_plaintext_server_is_not_mistaken_for_tls():
    async with tts_server() as server:
        assert not await speaks_tls(target(server))
        assert (await server_info(server, ClientSecurity())).backend == "double"


async def test_the_certificate_rotates_without_a_restart(tmp_path, pki, token, token_file):
    async with tts_server(**secured(pki, token_file)) as server:
        await server_info(server, client(pki, token))
        # A new CA signs the new server certificate; the new files replace the old ones.
        new_ca = make_ca("renewed CA")
        new_server = make_leaf(new_ca, "server", server=True)
        new_ca_file = write_cert(tmp_path / "new-ca.crt", new_ca[0])
        staged = tmp_path / "staged"
        staged.mkdir()
        write_cert(staged / "server.crt", new_server[0])
        write_key(staged / "server.key", new_server[1])
        os.replace(staged / "server.key", pki.server_key)
        os.replace(staged / "server.crt", pki.server_cert)
        renewed = replace(client(pki, token), ca=new_ca_file)
        assert (await server_info(server, renewed)).backend == "double"
        old_trust = await refusal(server, client(pki, token))
        assert server.certificates is not None and server.certificates.reloads == 1
        # A broken replacement (a key of another certificate) is refused; the last one serves.
        shutil.copy(pki.client_key, pki.server_key)
        assert (await server_info(server, renewed)).backend == "double"
        assert server.certificates.reloads == 1
    assert old_trust.code() == grpc.StatusCode.UNAVAILABLE


# ---- exposure -----------------------------------------------------------------------------------


def test_a_network_address_without_tls_and_tokens_is_refused_unless_insecure(
    pki, token, token_file, capsys
):
    with pytest.raises(ValidationError, match="--insecure"):
        AsrSettings(host="0.0.0.0")
    with pytest.raises(ValidationError, match="TLS and tokens"):
        AsrSettings(host="0.0.0.0", tokens=token)  # tokens alone would cross the network plain
    assert AsrSettings(host="0.0.0.0", insecure=True).insecure
    assert AsrSettings(host="0.0.0.0", **secured(pki, token_file)).uses_tokens  # type: ignore[arg-type]
    tls_only = {**secured(pki, token_file, mutual=False), "token_file": ""}
    with pytest.raises(ValidationError, match="mutual TLS"):
        AsrSettings(host="0.0.0.0", **tls_only)  # type: ignore[arg-type]  # anyone may call
    mutual_only = {**secured(pki, token_file), "token_file": ""}
    # Client certificates authenticate callers as tokens do.
    assert AsrSettings(host="0.0.0.0", **mutual_only).authenticates_clients  # type: ignore[arg-type]
    assert AsrSettings(host="127.0.0.1").host == "127.0.0.1"  # the local default is unchanged
    # Through the command line: refused with exit 2 before anything binds.
    assert serve.main("asr", ["--host", "0.0.0.0", "--check-config"]) == serve.EXIT_BAD_CONFIG
    assert "--insecure" in capsys.readouterr().err


def test_loopback_is_told_from_the_network():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.5", "gpu-box.lan"):
        assert not is_loopback(host), host


def test_settings_are_checked_at_start_naming_the_setting(pki, tmp_path):
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        AsrSettings(tls_cert=str(pki.server_cert))
    with pytest.raises(ValidationError, match="do not load"):
        AsrSettings(tls_cert=str(pki.server_cert), tls_key=str(pki.client_key))
    with pytest.raises(ValidationError, match="needs TLS"):
        AsrSettings(tls_client_ca=str(pki.ca))
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ValidationError, match="no token in the file"):
        AsrSettings(token_file=str(tmp_path / "empty"))


def test_shared_variables_apply_to_every_server_and_their_own_win(
    monkeypatch, pki, token_file, tmp_path
):
    other = tmp_path / "asr-tokens"
    other.write_text("asr-only\n")
    monkeypatch.setenv("NEMOTRON_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("NEMOTRON_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("NEMOTRON_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("NEMOTRON_ASR_TOKEN_FILE", str(other))
    asr, tts = AsrSettings(), TtsSettings()
    assert asr.tls_cert == tts.tls_cert == str(pki.server_cert)
    assert asr.token_file == str(other) and tts.token_file == str(token_file)


def test_tokens_have_no_flag_and_no_repr(token):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, AsrSettings)
    assert "--tokens" not in parser.format_help() and "--token-file" in parser.format_help()
    assert token not in repr(AsrSettings(tokens=token))
    assert token not in repr(ClientSecurity(token=token))


# ---- clients: flags and environment -------------------------------------------------------------


def test_client_flags_override_the_environment(monkeypatch, pki, token, token_file):
    monkeypatch.setenv("NEMOTRON_TLS_CA", str(pki.other_ca))
    monkeypatch.setenv("NEMOTRON_TOKEN", "from-env")
    parser = argparse.ArgumentParser()
    add_security_flags(parser)
    from_env = security_from_args(parser.parse_args([]))
    assert from_env.ca == pki.other_ca and from_env.token == "from-env"
    flags = ["--tls-ca", str(pki.ca), "--token-file", str(token_file)]
    flags += ["--tls-client-cert", str(pki.client_cert), "--tls-client-key", str(pki.client_key)]
    given = security_from_args(parser.parse_args(flags))
    assert (given.ca, given.cert, given.token) == (pki.ca, pki.client_cert, token)
    with pytest.raises(ClientSecurityError, match="needs its key"):
        ClientSecurity(ca=pki.ca, cert=pki.client_cert)
    with pytest.raises(ClientSecurityError, match="NEMOTRON_TOKEN_FILE"):
        ClientSecurity.from_env({"NEMOTRON_TOKEN_FILE": str(pki.ca.parent / "missing")})


def test_up_hands_its_security_flags_to_the_children_as_variables(pki, token_file):
    parser = argparse.ArgumentParser()
    add_up_parser(parser.add_subparsers(dest="command"))
    server_flags = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    args = parser.parse_args(
        ["up", *server_flags, "--tls-ca", str(pki.ca), "--token-file", str(token_file)]
    )
    env = security_env(args)
    assert env["NEMOTRON_TLS_CERT"] == str(pki.server_cert.resolve())
    assert env["NEMOTRON_TOKEN_FILE"] == str(token_file.resolve())
    assert ClientSecurity.from_env(env).uses_tls
    no_ca = parser.parse_args(["up", "--tls-cert", str(pki.server_cert)])
    with pytest.raises(ClientSecurityError, match="--tls-ca"):
        security_env(no_ca)


# ---- no token in logs or traces of a real server process ----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_the_token_never_reaches_the_server_log_or_its_traces(tmp_path, token):
    wrong = "tok-" + secrets.token_urlsafe(24)
    traces = tmp_path / "traces.jsonl"
    env = {
        **os.environ,
        "NEMOTRON_TOKENS": token,
        "NEMOTRON_TRACE_FILE": str(traces),
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "NEMOTRON_TRACE_CONTENT": "true",
    }
    server = await start_serve_double("tts", "--log-level", "DEBUG", env=env)
    try:
        await server.wait_serving()
        errors = []
        for sent in ("", wrong, token):
            async with open_channel(server.target, ClientSecurity(token=sent)) as channel:
                stub = info_pb2_grpc.ServerInfoServiceStub(channel)
                try:
                    await stub.GetServerInfo(info_pb2.GetServerInfoRequest(), timeout=5)
                except grpc.aio.AioRpcError as err:
                    errors.append(f"{err!r} {err.details()} {err.debug_error_string()}")
    finally:
        log = await server.stop()
    assert len(errors) == 2 and "UNAUTHENTICATED" in errors[1]
    assert log.count("refused /nemotron.speech.v1.ServerInfoService/GetServerInfo") == 2
    recorded = traces.read_text()
    assert "GetServerInfo" in recorded  # the calls were traced ...
    for secret in (token, wrong):  # ... and no token is anywhere
        assert secret not in log and secret not in recorded and secret not in "".join(errors)


def test_serve_help_lists_the_security_settings():
    done = subprocess.run(
        [sys.executable, "-m", "services.asr", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for flag in ("--tls-cert", "--tls-client-ca", "--token-file", "--insecure", "NEMOTRON_TLS_KEY"):
        assert flag in done.stdout


# ---- end to end: a bot pipeline over TLS, mutual TLS and tokens ---------------------------------


class Frames(BaseObserver):
    """The frames pushed in a pipeline, by type name."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Frame] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        self.seen.append(data.frame)

    def of(self, kind: type[Frame]) -> list[Frame]:
        return [frame for frame in self.seen if isinstance(frame, kind)]


@asynccontextmanager
async def secured_mesh(security: dict[str, object]) -> AsyncIterator[Targets]:
    """The three servers around backend doubles, each with `security`."""
    base = {"port": 0, "shutdown_grace_s": 0, **security}
    services = [
        AsrService(AsrSettings(**base), CountingAsrBackendDouble()),  # type: ignore[arg-type]
        TtsService(TtsSettings(**base), ToneTtsBackendDouble()),  # type: ignore[arg-type]
        LlmService(
            LlmSettings(**base, continue_timeout_s=5),  # type: ignore[arg-type]
            ScriptedLlmBackendDouble("Hello there. How are you?"),
        ),
    ]
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(running(s)) for s in services]
        yield Targets(*(target(server) for server in servers))


@asynccontextmanager
async def bot(config: BotConfig, speech: bytes) -> AsyncIterator[tuple[Frames, WavFileTransport]]:
    transport = WavFileTransport(speech)
    worker, _services = build_worker(config, transport)
    frames = Frames()
    worker.add_observer(frames)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        yield frames, transport
    finally:
        await worker.cancel()
        await asyncio.wait_for(task, 20)


async def until(condition: Callable[[], object], timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_bot_pipeline_talks_over_mutual_tls_with_a_token(pki, token, token_file, caplog):
    caplog.set_level(logging.DEBUG)
    async with secured_mesh(secured(pki, token_file)) as targets:
        config = BotConfig(
            name="secure",
            turn=TurnSettings(vad_stop_s=0.3, smart_turn=False),
            targets=targets,
            security=client(pki, token),
        )
        async with bot(config, speech_pcm("Hello, can you hear me?")) as (frames, transport):
            await until(lambda: frames.of(BotStoppedSpeakingFrame), 60)
    assert not frames.of(ErrorFrame)
    assert len(transport.output().played.pcm) > 0
    assert token not in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_plaintext_bot_against_tls_servers_fails_at_once_saying_why(pki, token_file):
    async with secured_mesh(secured(pki, token_file, mutual=False)) as targets:
        config = BotConfig(
            name="plain",
            turn=TurnSettings(vad_stop_s=0.3, smart_turn=False),
            targets=targets,
            security=ClientSecurity(),
        )
        async with bot(config, b"") as (frames, _transport):
            await until(lambda: frames.of(ErrorFrame), 30)
    error = frames.of(ErrorFrame)[0]
    assert isinstance(error, ErrorFrame)
    assert "UNAVAILABLE" in error.error and "speaks TLS" in error.error
