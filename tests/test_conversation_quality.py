"""The conversation benchmark (`python -m loadtest quality`): its parts, and a short run end to end.

The end-to-end run starts the real CPU servers and a real bot, and checks that the report is
complete and its measurements sane (a barge-in measured, latencies positive, context accuracy
computed); never how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from clients.targets import Targets
from loadtest.conversation_quality import bot_config, build_parser, run
from loadtest.conversation_quality_metrics import (
    BargeIn,
    EchoRun,
    Measurements,
    TurnEnd,
    figures,
    played_prefix,
    report,
    words,
    write_json,
    written_words,
)
from loadtest.conversation_quality_scripts import (
    RATE,
    backchannel,
    paused_turn,
    say,
    speech_level,
)
from loadtest.conversation_quality_transport import (
    FRAME_SAMPLES,
    EchoPath,
    LoopbackTransport,
    PlayedChunk,
    gain_of,
)
from loadtest.testset import has_espeak
from services.runtime.audio import pcm16_to_float

TARGETS = Targets(asr="127.0.0.1:1", tts="127.0.0.1:2", llm="127.0.0.1:3")


def test_the_echo_path_delays_and_attenuates_what_the_speaker_played():
    origin = 100.0
    echo = EchoPath(delay_s=0.06, gain=gain_of(-20.0), origin=origin)
    echo.start_reading(origin + 0.02)  # the first microphone frame: acoustic [0, 20 ms]
    played = np.ones(RATE // 10, dtype=np.float32)  # 100 ms of full scale, played from 10 ms
    echo.write(echo.index(origin + 0.01), played)
    heard = np.concatenate([echo.read() for _ in range(12)])  # 240 ms of microphone
    loud = np.flatnonzero(heard > 0)
    # Played from 10 ms, heard from 70 ms, for 100 ms, at a tenth of the amplitude (-20 dB).
    assert loud[0] == round(0.07 * RATE) and loud.size == played.size
    assert np.allclose(heard[loud], 0.1)
    # What was read is gone: the ring never replays it.
    assert not np.any(np.concatenate([echo.read() for _ in range(250)]))


def test_no_echo_level_means_a_silent_path():
    echo = EchoPath(delay_s=0.06, gain=gain_of(None), origin=0.0)
    echo.start_reading(0.02)
    echo.write(0, np.ones(RATE, dtype=np.float32))
    assert echo.read().size == FRAME_SAMPLES and not echo.read().any()


def test_played_chunks_tell_when_the_speaker_stopped():
    transport = LoopbackTransport(echo_db=None, delay_s=0.06)
    output = transport.output()
    output.chunks += [PlayedChunk(10.0 + 0.04 * k, 0.04, b"") for k in range(10)]
    output.chunks.append(PlayedChunk(20.0, 0.04, b""))
    output.chunks.insert(10, PlayedChunk(10.5, 0.04, b""))  # after a silence of 100 ms
    # The speech playing at 10.13 s stopped at its next silence of 50 ms, or of 250 ms.
    assert output.stopped_after(10.13) == pytest.approx(10.4)
    assert output.stopped_after(10.13, gap_s=0.25) == pytest.approx(10.54)
    assert output.gaps(10.0, 21.0, 0.25) == [pytest.approx(10.54)]
    assert output.gaps(10.0, 21.0, 0.05) == [pytest.approx(10.4), pytest.approx(10.54)]
    assert output.playing_at(10.2) and not output.playing_at(15.0)
    assert output.played_s(10.0, 11.0) == pytest.approx(0.44)
    first = output.first_after(10.5)
    assert first is not None and first.start == 20.0


def test_the_scripts_know_where_their_speech_starts_and_ends():
    question = say("What is the capital of Australia?")
    assert 0 <= question.onset_s < question.offset_s <= question.duration_s
    mm = backchannel("mm-hm")
    assert mm.offset_s - mm.onset_s < 1.0
    if has_espeak():
        # A hum (espeak-ng would spell "mm-hm" out as letters), as loud as the user's words.
        user, hum = (speech_level(pcm16_to_float(s.pcm)) for s in (question, mm))
        assert hum == pytest.approx(user, rel=0.1)
    head, tail, pause = paused_turn(0)
    # The pause is exactly the silence after the first half's speech.
    assert head.duration_s - head.offset_s == pytest.approx(pause, abs=0.001)
    assert tail.onset_s == 0.0


def test_the_played_prefix_is_aligned_on_the_generated_words():
    generated = words("Once upon a time, a brave little dog lived by the sea.")
    assert played_prefix(generated, words("once upon a time a brave")) == 6
    assert played_prefix(generated, words("once upon a tine a brav little")) == 7
    assert played_prefix(generated, []) == 0
    # A number is one word as written, however many it is spoken as (context accuracy counts
    # written words, so that a stored "1879," is not five words more than an ASR's "18s").
    written = written_words("Once upon a time, in the year 1879, a girl - Ada - lived.")
    assert len(written) == 12  # the dashes are no words
    heard = words("once upon a time in the year eighteen seventy nine a")
    assert played_prefix(written, heard) == 9


def test_overrides_go_to_the_turn_settings_or_the_bot_config():
    config = bot_config("simple_vad", ["max_tokens=321"], TARGETS)
    assert config.max_tokens == 321 and config.targets == TARGETS
    if hasattr(config, "turn"):
        tuned = bot_config("simple_vad", ["barge_in_min_words=2", "vad_stop_s=0.5"], TARGETS)
        assert tuned.turn.barge_in_min_words == 2 and tuned.turn.vad_stop_s == 0.5
    with pytest.raises(SystemExit, match="not a setting"):
        bot_config("simple_vad", ["no_such_setting=1"], TARGETS)


def test_figures_and_report_from_measurements(tmp_path):
    m = Measurements(
        barge_ins=[
            BargeIn(2.0, 180.0, 20, 7, 7, 2.1, True),
            BargeIn(3.0, None, 25, 9, 12, 3.2, False),
        ],
        echo=[EchoRun(-20.0, bot_speech_s=300.0, false_barge_ins=1)],
        turns=[TurnEnd("paused", 0.7, 900.0, True), TurnEnd("question", 0.0, 700.0, False)],
    )
    summary = figures(m)
    assert summary["barge_in_ms_p50"] == 180.0 and summary["missed_barge_ins"] == 1
    assert summary["context_accuracy_pct"] == 50.0
    assert summary["false_barge_ins"] == {
        "-20 dB": {
            "bot_speech_min": 5.0,
            "false_barge_ins": 1,
            "per_10_min": 2.0,
            "user_turns_started": 0,
            "audio_gaps": 0,
            "stalls": 0,
        }
    }
    assert summary["premature_turn_ends"] == 1 and summary["turn_end_ms_p50"] == 800.0
    assert "false barge-ins, echo -20 dB" in report(summary)
    write_json(tmp_path / "q.json", {"bot": "x"}, m)
    assert json.loads((tmp_path / "q.json").read_text())["figures"]["barge_ins"] == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_short_run_end_to_end_against_the_real_servers(tmp_path):
    args = build_parser().parse_args(
        [
            "--bot",
            "interleaved_streaming",
            "--repetitions",
            "1",
            "--scenarios",
            "barge-in,echo",
            "--echo-minutes",
            "0.08",
            "--echo-levels=-10",
            "--max-tokens",
            "160",
            "--out",
            str(tmp_path / "quality.json"),
        ]
    )
    result = await asyncio.wait_for(run(args), 230)
    summary = result["figures"]
    m: Measurements = result["measurements"]
    assert result["cpu"] and result["settings"]
    # The question was answered: a turn end with a positive latency.
    assert m.turns and all(t.latency_ms is not None and t.latency_ms > 0 for t in m.turns)
    # The long reply was interrupted: a barge-in measured (or reported missed), context judged.
    assert len(m.barge_ins) + m.not_interruptible == 1
    for barge_in in m.barge_ins:
        assert barge_in.latency_ms is None or barge_in.latency_ms >= 0
        assert barge_in.generated_words > 0 and barge_in.played_s > 0
        assert barge_in.accurate is not None
        assert summary["context_judged"] == 1
    # The bot spoke with its echo fed back, and the run counted what that did.
    (echo,) = m.echo
    assert echo.echo_db == -10.0 and echo.bot_speech_s > 0 and echo.replies >= 1
    per_10 = summary["false_barge_ins"]["-10 dB"]["per_10_min"]
    assert per_10 is not None and not math.isnan(per_10) and per_10 >= 0


def test_the_benchmark_refuses_a_reference_asr_off_this_machine():
    from loadtest.conversation_quality import main

    with pytest.raises(SystemExit, match="loopback only"):
        main(["--reference-asr", "10.1.2.3:50051", "--scenarios", "echo"])


def test_the_level_of_a_silent_utterance_is_a_clear_error():
    with pytest.raises(ValueError, match="silent"):
        speech_level(np.zeros(1600, dtype=np.float32))
