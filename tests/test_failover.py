"""Replicas behind gRPC's own balancing: conversations survive a replica killed and one drained.

Three replicas of each server on 127.0.0.2-127.0.0.4 (real server processes with test-double
engines, so nine of them fit on two cores) and the load test's own conversations through
balanced targets (`ipv4:a,b,c`: round robin over the healthy replicas, retried starts).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pipecat.frames.frames import (
    InterimTranscriptionFrame,
    TranscriptionFrame,
    UserStoppedSpeakingFrame,
)

from bots.stt import GrpcSTTService
from clients.channel import open_channel
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, llm_pb2, llm_pb2_grpc
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from tests.adapter_bench import bench, until
from tests.doubles import REPLY, CountingAsrBackendDouble, ScriptedLlmBackendDouble
from tests.helpers import tone_pcm
from tests.servers import free_port, running, start_serve_double

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_conversations_survive_a_replica_killed_and_one_drained(tmp_path):
    report = tmp_path / "failover.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest",
        "failover",
        "--serve",
        f"{sys.executable} -m tests.serve_double {{service}}",
        "--replicas",
        "3",
        "--callers",
        "4",
        "--turns",
        "5",
        "--speed",
        "4",
        "--kill",
        "tts",
        "--kill-at-s",
        "3",
        "--drain",
        "asr",
        "--drain-at-s",
        "6",
        "--drain-grace-s",
        "1",
        "--turn-deadline-s",
        "10",
        "--json",
        str(report),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 140)
    text = out.decode()
    assert process.returncode == 0, text
    result = json.loads(report.read_text())
    # No conversation ended; every turn is either done or counted as lost.
    assert result["conversations_ended"] == 0, text
    assert result["turns_ok"] + result["turns_lost"] == result["turns"] == 20
    # At most the turn in flight per conversation and disruption.
    assert result["max_lost_per_hit"] <= 1, text
    kill, drain = result["disruptions"]
    assert kill["what"].startswith("kill tts@127.0.0.") and kill["conversations_hit"] >= 1, text
    assert drain["what"].startswith("drain asr@127.0.0."), text
    assert result["turns_lost"] <= kill["conversations_hit"] + drain["conversations_hit"]
    # Streams spread: every LLM replica served turns, and session streams used several replicas.
    spread = result["spread"]
    assert all(peak >= 1 for _, peak in spread["llm"].values()), text
    for service in ("asr", "tts"):
        assert sum(peak >= 1 for _, peak in spread[service].values()) >= 2, text
    assert "turns lost" in text and "mean streams" in text


async def _start(stub: llm_pb2_grpc.LlmServiceStub) -> grpc.aio.StreamStreamCall:
    call = stub.GenerateChunks()
    await call.write(
        llm_pb2.GenerateChunksRequest(
            start=llm_pb2.StartGeneration(
                request_id="r",
                messages=[llm_pb2.ChatMessage(role="user", content="hi")],
                chunking=llm_pb2.ChunkingPolicy(wait_for_continue=True),
            )
        )
    )
    await call.read()  # the first chunk: the stream holds its replica's slot from now on
    return call


@pytest.mark.timeout(30)
async def test_a_full_replica_is_skipped_and_a_draining_one_gets_no_new_streams():
    services = [
        LlmService(
            LlmSettings(host=host, port=0, max_streams=1, shutdown_grace_s=1),
            ScriptedLlmBackendDouble(REPLY),
        )
        for host in HOSTS
    ]
    async with running(services[0]) as a, running(services[1]) as b, running(services[2]) as c:
        target = "ipv4:" + ",".join(f"{h}:{s.port}" for h, s in zip(HOSTS, (a, b, c), strict=True))
        async with open_channel(target) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            await channel.channel_ready()
            await asyncio.sleep(0.3)  # round robin connects to every replica; let all be READY
            # Three starts fill the three replicas (one stream each): a start that lands on a
            # full replica is refused with RESOURCE_EXHAUSTED and retried on the next one.
            calls = [await _start(stub) for _ in HOSTS]
            assert [s.limiter.active for s in services] == [1, 1, 1]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _start(stub)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls:
                call.cancel()
            await asyncio.sleep(0.1)
            # A draining replica reports NOT_SERVING: the balancer sends it no new stream.
            draining = asyncio.create_task(b.stop())
            await asyncio.sleep(0.3)
            for _ in range(4):
                call = await _start(stub)
                assert services[1].limiter.active == 0
                call.cancel()
                await asyncio.sleep(0.05)
            await draining


@pytest.mark.timeout(30)
async def test_the_stt_adapter_reopens_on_another_replica_when_its_replica_goes():
    replicas = [
        AsrService(
            AsrSettings(host=host, port=0, max_streams=4, shutdown_grace_s=0),
            CountingAsrBackendDouble(),
        )
        for host in HOSTS[:2]
    ]
    async with running(replicas[0]) as first, running(replicas[1]) as second:
        servers = {id(replicas[0]): first, id(replicas[1]): second}
        target = f"ipv4:{HOSTS[0]}:{first.port},{HOSTS[1]}:{second.port}"
        stt = GrpcSTTService(target=target)
        async with bench(stt) as b:
            await until(lambda: stt.connected, 5, "the STT to connect")
            await b.say(tone_pcm(0.3))
            await b.down.wait_for(InterimTranscriptionFrame, 5)
            (holder,) = [r for r in replicas if r.limiter.active]
            (other,) = [r for r in replicas if r is not holder]
            gone = time.perf_counter()
            await servers[id(holder)].stop()  # its stream is cut; the other replica takes over
            await until(lambda: other.limiter.active == 1 and stt.connected, 5, "a new call")
            reopened_s = time.perf_counter() - gone
            await b.say(tone_pcm(0.2))
            await b.send(UserStoppedSpeakingFrame())
            await b.down.wait_for(UserStoppedSpeakingFrame, 5)
        [final] = b.down.all(TranscriptionFrame)
        assert final.text == "tick tick" and final.finalized  # the next turn works
        assert reopened_s < 2.0
        assert b.errors() == []


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_probes_health_port_and_the_autoscalers_stream_gauge():
    health_port = free_port()
    env = {**os.environ, "NEMOTRON_PROMETHEUS_PORT": "0"}
    server = await start_serve_double("asr", "--health-port", str(health_port), env=env)
    try:
        metrics = re.search(r"Prometheus metrics on ([\d.]+:\d+)/metrics", server.head)
        assert metrics is not None, server.head
        await server.wait_serving()
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as probe,
            grpc.aio.insecure_channel(server.target) as channel,
        ):
            # What kubelet's grpc probe asks: the health service alone, in plaintext.
            check = health_pb2_grpc.HealthStub(probe).Check
            reply = await check(health_pb2.HealthCheckRequest(service=AsrService.service_name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as other:  # nothing else is served there
                await asr_pb2_grpc.AsrServiceStub(probe).StreamingRecognize().read()
            assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
            call = asr_pb2_grpc.AsrServiceStub(channel).StreamingRecognize()
            await call.write(
                asr_pb2.StreamingRecognizeRequest(
                    config=asr_pb2.RecognitionConfig(sample_rate_hz=16000)
                )
            )
            await call.read()  # ready: the stream holds a slot

            def scrape() -> str:
                with urllib.request.urlopen(f"http://{metrics.group(1)}/metrics", timeout=10) as r:
                    return str(r.read().decode())

            text = await asyncio.to_thread(scrape)
            call.cancel()
        active = re.search(
            r'nemotron_streams_active\{[^}]*grpc_service="([^"]+)"[^}]*\} (\S+)', text
        )
        assert active is not None, text[-2000:]
        assert active.groups() == (AsrService.service_name, "1.0")
        assert re.search(r"nemotron_streams_max\{[^}]*\} 16.0", text), text[-2000:]
    finally:
        await server.stop()


@pytest.mark.timeout(30)
async def test_an_aged_connection_is_replaced_without_cutting_its_open_stream():
    settings = LlmSettings(port=0, max_connection_age_s=0.3, shutdown_grace_s=0.5)
    async with (
        running(LlmService(settings, ScriptedLlmBackendDouble(REPLY))) as server,
        open_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        held = await _start(stub)  # the first chunk; the rest waits for our continue
        states = [channel.get_state()]

        async def watch() -> None:
            while True:
                await channel.wait_for_state_change(states[-1])
                states.append(channel.get_state())

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(1.0)  # the connection is asked to go away (GOAWAY) meanwhile
        watcher.cancel()
        # The channel made new connections (re-resolving its target each time) ...
        assert grpc.ChannelConnectivity.CONNECTING in states, states
        await held.write(
            llm_pb2.GenerateChunksRequest(
                continue_generation=llm_pb2.ContinueGeneration(chunk_index=0)
            )
        )
        second = await held.read()
        assert second.chunk.index == 1  # ... and the open stream went on, on the old one
        held.cancel()
        fresh = await _start(stub)  # and new streams start, on a new connection
        fresh.cancel()
