"""Tool calls in the bots: the adapter's conversions, the bot's local tools, and a whole bot.

The bot tests run the pipeline `build_worker` builds (WAV transport, the three real adapters)
against the mesh's real servicers with test-double backends: the LLM double calls a tool, the bot
runs the handler registered for it, and the TTS double records what is spoken.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pipecat.frames.frames import (
    LLMAssistantPushAggregationFrame,
    LLMMessagesAppendFrame,
    TTSSpeakFrame,
)
from pipecat.services.llm_service import FunctionCallParams
from pipecat.workers.runner import WorkerRunner

from bots.llm import GrpcChunkedLLMService, chat_messages, tool_choice, tool_specs
from bots.pipeline import BotConfig, build_services, build_worker
from bots.tools import BotTools, spoken_duration, time_of
from bots.turn_settings import TurnSettings
from bots.wav_transport import WavFileTransport
from clients.targets import Targets
from nemotron.speech.v1 import llm_pb2
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from tests.adapter_bench import until
from tests.adapter_doubles import asr_service, tts_service
from tests.doubles import ToneTtsBackendDouble, ToolCallingLlmBackendDouble
from tests.servers import running, target_of

NOON = datetime(2026, 5, 5, 12, 30, 15, tzinfo=timezone(timedelta(hours=2), "CEST"))

# ---- the adapter's conversions ------------------------------------------------------------------


def test_chat_messages_carry_tool_calls_and_results_as_the_context_keeps_them():
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "set_timer", "arguments": '{"seconds": 60}'},
    }
    messages = chat_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "A timer, please."}]},
            {"role": "assistant", "content": "Let me check."},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"started": true}'},
            {"role": "tool", "tool_call_id": "call_unknown", "content": "orphan"},
            {"role": "assistant", "tool_calls": [{"id": "c2", "function": {"name": "t"}}]},
            {"role": "tool", "tool_call_id": "c2", "content": ""},
            {"role": "developer", "content": "not a chat role"},
        ]
    )
    assert [(m.role, m.content, m.tool_call_id) for m in messages] == [
        ("system", "Be brief.", ""),
        ("user", "A timer, please.", ""),
        ("assistant", "Let me check.", ""),
        ("assistant", "", ""),
        ("tool", '{"started": true}', "call_1"),  # the orphan result is left out
        ("assistant", "", ""),  # an empty result is left out, as any empty turn is
    ]
    assert messages[3].tool_calls == [
        llm_pb2.ToolCall(id="call_1", name="set_timer", arguments_json='{"seconds": 60}')
    ]
    assert messages[5].tool_calls[0].arguments_json == "{}"


def test_call_arguments_kept_as_a_mapping_are_sent_as_json():
    [message] = chat_messages(
        [
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "t", "arguments": {"a": 1}}}],
            }
        ]
    )
    assert json.loads(message.tool_calls[0].arguments_json) == {"a": 1}


def test_the_context_tools_reach_the_contract_through_pipecats_adapter():
    adapter = GrpcChunkedLLMService(target="127.0.0.1:1").get_llm_adapter()
    specs = tool_specs(adapter.from_standard_tools(BotTools().schema))
    assert [spec.name for spec in specs] == ["get_current_time", "set_timer", "cancel_timer"]
    timer = json.loads(specs[1].parameters_json)
    assert timer["type"] == "object" and timer["required"] == ["seconds"]
    assert "seconds" in timer["properties"] and specs[1].description
    assert tool_specs(adapter.from_standard_tools(None)) == []
    assert tool_specs([{"type": "web_search"}]) == []  # a provider's own tool has no equivalent


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_AUTO)),
        ("none", llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NONE)),
        ("required", llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_REQUIRED)),
        (
            {"type": "function", "function": {"name": "set_timer"}},
            llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NAMED, name="set_timer"),
        ),
        (object(), None),  # NOT_GIVEN and anything unknown: unset, the server's AUTO
    ],
)
def test_tool_choice(choice, expected):
    assert tool_choice(choice) == expected


# ---- the bot's tools ----------------------------------------------------------------------------


class Worker:
    """Stands in for the PipelineWorker a handler's timer queues its announcement into."""

    def __init__(self) -> None:
        self.queued: list[Any] = []

    async def queue_frames(self, frames: list[Any]) -> None:
        self.queued.extend(frames)


async def call(handler: Callable[..., Any], worker: Worker | None = None, **arguments: Any) -> Any:
    """Run a tool handler as Pipecat would; its result."""
    results: list[Any] = []

    async def result_callback(result: Any, *, properties: Any = None) -> None:
        results.append(result)

    params = FunctionCallParams(
        function_name=handler.__name__,
        tool_call_id="call_test",
        arguments=arguments,
        llm=None,  # type: ignore[arg-type]
        pipeline_worker=worker or Worker(),  # type: ignore[arg-type]
        context=None,  # type: ignore[arg-type]
        result_callback=result_callback,
    )
    await handler(params)
    [result] = results
    return result


def test_the_time_is_given_for_speech_and_as_iso_8601():
    assert time_of(NOON) == {
        "time": "12:30 PM",
        "date": "Tuesday, May 5, 2026",
        "time_zone": "CEST (UTC+0200)",
        "iso": "2026-05-05T12:30:15+02:00",
    }
    assert time_of(NOON.replace(hour=0, minute=5))["time"] == "12:05 AM"
    assert spoken_duration(3900) == "1 hour 5 minutes"
    assert spoken_duration(90) == "1 minute 30 seconds"
    assert spoken_duration(0.2) == "1 second"


async def test_get_current_time_answers_with_the_local_time():
    tools = BotTools(clock=lambda: NOON)
    assert await call(tools.get_current_time) == time_of(NOON)


@pytest.mark.timeout(5)
async def test_a_timer_announces_itself_in_the_pipeline_when_it_fires():
    tools, worker = BotTools(clock=lambda: NOON), Worker()
    result = await call(tools.set_timer, worker, seconds=0.1, label="tea")
    assert result == {"started": {"label": "tea", "duration": "1 second", "fires_at": "12:30 PM"}}
    assert len(tools.timers) == 1 and worker.queued == []
    await until(lambda: worker.queued, 2, "the timer to fire")
    speak, push = worker.queued
    assert isinstance(speak, TTSSpeakFrame) and speak.text == "Your tea timer is done."
    assert isinstance(push, LLMAssistantPushAggregationFrame)
    assert tools.timers == {}


@pytest.mark.timeout(5)
async def test_timers_are_cancelled_by_label_and_all_of_them_on_close():
    tools, worker = BotTools(clock=lambda: NOON), Worker()
    await call(tools.set_timer, worker, seconds=0.2, label="Tea")
    await call(tools.set_timer, worker, seconds=0.2, label="eggs")
    tasks = [timer.task for timer in tools.timers.values()]
    result = await call(tools.cancel_timer, worker, label="tea")
    assert [t["label"] for t in result["cancelled"]] == ["Tea"]
    assert [t["label"] for t in result["still_running"]] == ["eggs"]
    await tools.close()
    assert tools.timers == {} and all(task is not None and task.cancelled() for task in tasks)
    await asyncio.sleep(0.3)
    assert worker.queued == []  # neither spoke


async def test_set_timer_refuses_what_the_schema_would_have():
    tools = BotTools()
    assert "error" in await call(tools.set_timer, seconds=0)
    assert "error" in await call(tools.set_timer, seconds="soon")
    assert "error" in await call(tools.set_timer, seconds=True)
    assert tools.timers == {}


def test_the_bot_offers_its_tools_unless_told_not_to():
    services = build_services(
        BotConfig(name="t", turn=TurnSettings(vad_stop_s=0.2, smart_turn=False))
    )
    assert services.tools is not None
    assert [t.name for t in services.context.tools.standard_tools] == [
        "get_current_time",
        "set_timer",
        "cancel_timer",
    ]
    assert all(services.llm.has_function(name) for name in ("get_current_time", "set_timer"))
    plain = build_services(
        BotConfig(name="t", turn=TurnSettings(vad_stop_s=0.2, smart_turn=False), tools=False)
    )
    assert plain.tools is None and not plain.llm.has_function("set_timer")


# ---- a whole bot --------------------------------------------------------------------------------


class Bot:
    """The bot `build_worker` builds, on a silent WAV transport, against double-backed servers."""

    def __init__(self, targets: Targets, tts: ToneTtsBackendDouble) -> None:
        config = BotConfig(
            name="tools",
            turn=TurnSettings(vad_stop_s=0.2, smart_turn=False),
            targets=targets,
        )
        self.worker, self.services = build_worker(config, WavFileTransport())
        assert self.services.tools is not None
        self.tools = self.services.tools
        self.tts = tts
        self.calls: list[tuple[str, dict[str, Any]]] = []
        for name in ("get_current_time", "set_timer", "cancel_timer"):
            self.services.llm.register_function(name, self._spy(getattr(self.tools, name)))

    def _spy(self, handler: Callable[[FunctionCallParams], Any]) -> Any:
        async def spy(params: FunctionCallParams) -> None:
            self.calls.append((params.function_name, dict(params.arguments)))
            await handler(params)

        return spy

    async def ask(self, text: str) -> None:
        message = {"role": "user", "content": text}
        await self.worker.queue_frames([LLMMessagesAppendFrame([message], run_llm=True)])

    def spoken(self) -> list[str]:
        return [job.text for job in self.tts.jobs]

    async def until_spoken(self, words: str, timeout_s: float = 10) -> str:
        await until(lambda: any(words in text for text in self.spoken()), timeout_s, words)
        return next(text for text in self.spoken() if words in text)


@asynccontextmanager
async def bot_with(llm: ToolCallingLlmBackendDouble) -> AsyncIterator[Bot]:
    tts = ToneTtsBackendDouble()
    settings = LlmSettings(port=0, max_streams=4, shutdown_grace_s=0, continue_timeout_s=5)
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(running(service))
            for service in (asr_service(0), tts_service(0, tts), LlmService(settings, llm))
        ]
        bot = Bot(Targets(*(target_of(server) for server in servers)), tts)
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(bot.worker)
        task = asyncio.create_task(runner.run())
        try:
            yield bot
        finally:
            await bot.worker.cancel()
            await asyncio.wait_for(task, 20)


def never_spoken_calls(bot: Bot) -> None:
    """No tool call (its name or its arguments) went to the TTS."""
    for text in bot.spoken():
        assert "set_timer" not in text and "get_current_time" not in text, text
        assert '"seconds"' not in text, text


@pytest.mark.timeout(30)
async def test_the_bot_sets_a_timer_speaks_the_result_and_announces_the_timer():
    llm = ToolCallingLlmBackendDouble([("set_timer", '{"seconds": 1, "label": "tea"}')])
    async with bot_with(llm) as bot:
        await bot.ask("Set a tea timer for one second.")
        answer = await bot.until_spoken("The results are:")
        answered_at = time.monotonic()
        await bot.until_spoken("Your tea timer is done.", 5)
        assert time.monotonic() - answered_at < 2.5
        await until(lambda: bot.tools.timers == {}, 2, "the timer to be gone")

    assert bot.calls == [("set_timer", {"seconds": 1, "label": "tea"})]
    first, second = llm.requests[:2]
    assert [tool.name for tool in first.tools] == ["get_current_time", "set_timer", "cancel_timer"]
    # The second request: what was said before the call, the call, and its result, in order.
    said, made, result = second.messages[-3:]
    assert (said.role, said.content.strip()) == ("assistant", "Let me check.")
    assert made.role == "assistant" and not made.content
    [call_made] = made.tool_calls
    assert call_made.name == "set_timer"
    assert json.loads(call_made.arguments) == {"seconds": 1, "label": "tea"}
    assert result.role == "tool" and result.tool_call_id == call_made.id
    started = json.loads(result.content)["started"]
    assert started["label"] == "tea" and started["duration"] == "1 second"
    # The spoken answer carries the result; the call itself was never spoken.
    assert '"label": "tea"' in answer
    never_spoken_calls(bot)
    assert bot.spoken()[0].strip() == "Let me check."


@pytest.mark.timeout(30)
async def test_the_bot_tells_the_time():
    llm = ToolCallingLlmBackendDouble([("get_current_time", "{}")])
    async with bot_with(llm) as bot:
        bot.tools.clock = lambda: NOON
        await bot.ask("What time is it?")
        answer = await bot.until_spoken("The results are:")
    assert bot.calls == [("get_current_time", {})]
    result = llm.requests[1].messages[-1]
    assert result.role == "tool" and json.loads(result.content) == time_of(NOON)
    assert "twelve thirty p m" in answer  # as the TTS server's text normalization says it
    never_spoken_calls(bot)


@pytest.mark.timeout(30)
async def test_a_call_that_breaks_its_schema_is_answered_with_the_error_not_run():
    llm = ToolCallingLlmBackendDouble([("set_timer", '{"seconds": "soon"}')])
    async with bot_with(llm) as bot:
        await bot.ask("Set a timer.")
        answer = await bot.until_spoken("The results are:")
    assert bot.calls == []
    result = llm.requests[1].messages[-1]
    assert result.role == "tool" and "The call was not run" in json.loads(result.content)["error"]
    assert "not run" in answer
    assert bot.tools.timers == {}


@pytest.mark.timeout(30)
async def test_calls_that_run_and_calls_that_broke_their_schema_get_one_answer_between_them():
    llm = ToolCallingLlmBackendDouble(
        [("set_timer", '{"seconds": "soon"}'), ("get_current_time", "{}"), ("no_such_tool", "{}")]
    )
    async with bot_with(llm) as bot:
        await bot.ask("Set a timer, and what time is it?")
        await bot.until_spoken("The results are:")
        await asyncio.sleep(0.5)  # time for any further response
        assert len(llm.requests) == 2
    assert bot.calls == [("get_current_time", {})]
    results = {m.tool_call_id: m.content for m in llm.requests[1].messages if m.role == "tool"}
    calls = {c.name: c.id for m in llm.requests[1].messages for c in m.tool_calls}
    assert set(calls) == {"set_timer", "get_current_time", "no_such_tool"}
    assert "not run" in json.loads(results[calls["set_timer"]])["error"]
    assert "time" in json.loads(results[calls["get_current_time"]])
    # A tool the request does not offer is the server's to flag, so it is not run either.
    assert "does not offer" in json.loads(results[calls["no_such_tool"]])["error"]


@pytest.mark.timeout(30)
async def test_a_running_timer_is_cancelled_when_the_bot_stops():
    llm = ToolCallingLlmBackendDouble([("set_timer", '{"seconds": 600}')])
    async with bot_with(llm) as bot:
        await bot.ask("Set a ten minute timer.")
        await bot.until_spoken("The results are:")
        [timer] = bot.tools.timers.values()
    assert bot.tools.timers == {}
    assert timer.task is not None and timer.task.cancelled()
    assert not any("timer is done" in text for text in bot.spoken())
