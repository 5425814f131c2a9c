"""The turn-taking rules without models: settings, word placement, the cut, the barge-in gate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import numpy as np
import pytest
from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import (
    AggregatedTextFrame,
    BotStartedSpeakingFrame,
    Frame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMFullResponseStartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from bots.barge_in import BargeInGate, own_words, said_any
from bots.echo import EchoCanceller, EchoReference, wants_echo_cancellation
from bots.echo_floor import ECHO_FLOOR
from bots.heard import HEARD_AFTER_S, HeardWords
from bots.pipeline import vad_params
from bots.playout import PIECE_S, PlayoutAck, PlayoutGate, pieces
from bots.tts import GrpcTTSService, _Segment
from bots.turn_settings import (
    DEFAULT_BACKCHANNELS,
    TurnSettings,
    TurnSettingsError,
    add_turn_flags,
    flags_to_environment,
)
from nemotron.speech.v1 import asr_pb2, tts_pb2
from tests.speech import speech_pcm

pytestmark = pytest.mark.timeout(30)

RATE = 16000
#: The word rules alone (no minimum length), the VAD's start and stop lags as the frames say.
GATED = TurnSettings(barge_in_min_words=1, barge_in_min_s=0.0, vad_start_s=0.0)


# ---- settings ----------------------------------------------------------------------------------


def test_the_environment_overrides_a_bots_defaults_and_names_a_bad_value():
    bot = TurnSettings(vad_stop_s=0.8, smart_turn=False)
    env = {
        "NEMOTRON_BOT_VAD_STOP_S": "0.5",
        "NEMOTRON_BOT_BARGE_IN_MIN_WORDS": "2",
        "NEMOTRON_BOT_BACKCHANNELS": "Yeah, mm-hm",
        "NEMOTRON_BOT_ECHO_CANCELLATION": "webrtc",
    }
    turn = bot.with_environment(env)
    assert (turn.vad_stop_s, turn.smart_turn, turn.barge_in_min_words) == (0.5, False, 2)
    assert turn.backchannels == ("yeah", "mm-hm")
    assert turn.echo_cancellation == "webrtc" and turn.barge_in_gated
    with pytest.raises(TurnSettingsError, match="NEMOTRON_BOT_SMART_TURN"):
        bot.with_environment({"NEMOTRON_BOT_SMART_TURN": "perhaps"})
    with pytest.raises(TurnSettingsError, match="echo_cancellation"):
        bot.with_environment({"NEMOTRON_BOT_ECHO_CANCELLATION": "speex"})
    with pytest.raises(TurnSettingsError, match="vad_confidence"):
        TurnSettings(vad_confidence=1.5)


def test_turn_flags_become_variables_and_the_runners_flags_stay():
    env: dict[str, str] = {}
    rest = flags_to_environment(
        ["-t", "webrtc", "--barge-in-min-s", "0.3", "--port", "7861", "--smart-turn=false"], env
    )
    assert rest == ["-t", "webrtc", "--port", "7861"]
    assert env == {"NEMOTRON_BOT_BARGE_IN_MIN_S": "0.3", "NEMOTRON_BOT_SMART_TURN": "false"}
    with pytest.raises(TurnSettingsError, match="--vad-stop-s"):
        flags_to_environment(["--vad-stop-s", "soon"], {})
    parser = argparse.ArgumentParser()
    add_turn_flags(parser)
    assert "NEMOTRON_BOT_USER_IDLE_S" in parser.format_help()


def test_the_bots_keep_their_endpointing():
    from bots.interleaved_streaming import CONFIG as default
    from bots.simple_vad import CONFIG as simple

    assert (default.turn.vad_stop_s, default.turn.smart_turn) == (0.2, True)
    assert (simple.turn.vad_stop_s, simple.turn.smart_turn) == (0.8, False)
    # The tuned defaults (README, "Conversation quality"): a word and 0.6 s of speech (or a
    # command) confirm a barge-in, the bot pauses at the VAD's start meanwhile, and echo is
    # cancelled where the transport needs it.
    assert default.turn.barge_in_gated and default.turn.resume_after_false_interruption
    assert (default.turn.barge_in_min_words, default.turn.echo_cancellation) == (1, "auto")
    assert default.turn.barge_in_min_s == 0.6 and "stop" in default.turn.barge_in_commands


class _Speakerphone:
    hears_its_speaker = True


class _LocalAudioInput:
    """Stands in for Pipecat's local audio transport (a microphone beside the speaker)."""


_LocalAudioInput.__module__ = "pipecat.transports.local.audio"


def test_auto_echo_cancellation_follows_the_transport():
    assert wants_echo_cancellation("auto", _Speakerphone())
    assert wants_echo_cancellation("auto", _LocalAudioInput())
    assert not wants_echo_cancellation("auto", object())  # e.g. the browser's WebRTC
    assert wants_echo_cancellation("webrtc", object())
    assert not wants_echo_cancellation("off", _Speakerphone())


# ---- what counts as words ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "own", "backchannel"),
    [
        ("Yeah.", 0, 1),
        ("Mm-hm, yeah!", 0, 2),
        ("I see.", 0, 2),
        ("Okay, okay.", 0, 2),
        ("Stop, wait.", 2, 0),
        ("Yeah, but what about Paris?", 4, 1),
        ("Mmm... hmm-hmm, m-m-m.", 0, 3),
        ("Umm, what about Rome?", 3, 1),
        ("Thank you.", 0, 2),  # also what Whisper makes of a hum or a breath
    ],
)
def test_backchannels_do_not_count_as_words(text, own, backchannel):
    words, backchannels, echo = own_words(text, DEFAULT_BACKCHANNELS)
    assert (len(words), backchannels, echo) == (own, backchannel, 0)


def test_the_bots_own_recent_words_heard_back_do_not_count():
    words, _, echo = own_words("A friendly dragon.", (), {"a", "friendly", "dragon", "lived"})
    assert (words, echo) == ([], 3)
    words, _, echo = own_words("Stop the dragon", (), {"a", "friendly", "dragon"})
    assert (words, echo) == (["stop", "the"], 1)
    # As an ASR hears it back: cut short by an interim result, or a letter off.
    words, _, echo = own_words("The capi of France, Parish", (), {"the", "capital", "paris"})
    assert (words, echo) == (["of", "france"], 3)


# ---- words placed in the audio -----------------------------------------------------------------


class CapturingTts(GrpcTTSService):
    """The TTS adapter with its pushes captured instead of sent on (a test double)."""

    def __init__(self) -> None:
        super().__init__(target="127.0.0.1:9")
        self.sample_rate = RATE
        self.stream_id = "stream"
        self.pushed: list[Frame] = []

    async def push_frame(self, frame: Frame, direction: Any = None) -> None:  # type: ignore[override]
        self.pushed.append(frame)

    def open(self, segment_id: str, text: str) -> None:
        self._pending[segment_id] = _Segment(segment_id, text, 1, True)


def _chunk(segment: str, ms: float, words: list[tuple[str, int, float]] = ()) -> Any:  # type: ignore[assignment]
    return tts_pb2.AudioChunk(
        stream_id="stream",
        segment_id=segment,
        audio=bytes(2 * int(RATE * ms / 1000)),
        words=[
            tts_pb2.WordTiming(word=w, text_offset=o, start_ms=s, end_ms=s + 100)
            for w, o, s in words
        ],
    )


def _layout(frames: list[Frame]) -> list[tuple[str, object]]:
    """("audio", ms) and ("word", text) in push order."""
    out: list[tuple[str, object]] = []
    for frame in frames:
        if isinstance(frame, TTSAudioRawFrame):
            out.append(("audio", len(frame.audio) / 2 / RATE * 1000))
        elif isinstance(frame, TTSTextFrame):
            out.append(("word", frame.text))
    return out


async def test_each_word_is_pushed_where_its_audio_starts():
    tts = CapturingTts()
    text = " Hello there, friend."
    tts.open("s1", text)
    await tts._on_audio(_chunk("s1", 300, [("Hello", 1, 0.0), ("there,", 7, 250.0)]))
    await tts._on_audio(_chunk("s1", 300, [("friend.", 14, 420.0)]))
    assert _layout(tts.pushed) == [
        ("word", " Hello"),
        ("audio", 250.0),
        ("word", " there,"),
        ("audio", 50.0),
        ("audio", 120.0),
        ("word", " friend."),
        ("audio", 180.0),
    ]
    words = [f for f in tts.pushed if isinstance(f, TTSTextFrame)]
    assert "".join(w.text for w in words) == text  # the aggregator's concatenation
    assert all(w.includes_inter_frame_spaces and w.append_to_context for w in words)
    announced = next(f for f in tts.pushed if type(f) is AggregatedTextFrame)
    assert not announced.append_to_context and announced.will_be_spoken
    assert {w.segment_id for w in words} == {announced.id}


async def test_without_word_timings_words_are_placed_by_an_estimate_logged_once():
    tts = CapturingTts()
    records: list[str] = []
    sink = logger.add(records.append, level=logging.INFO)
    try:
        tts.open("s1", "One two three four.")  # 19 characters: about 1.4 s at 14 chars/s
        for _ in range(4):
            await tts._on_audio(_chunk("s1", 400))
        tts.open("s2", "Five six.")
        await tts._on_audio(_chunk("s2", 400))
    finally:
        logger.remove(sink)
    words = [f.text for f in tts.pushed if isinstance(f, TTSTextFrame)]
    assert words == ["One", " two", " three", " four.", "Five", " six."]
    layout = _layout(tts.pushed)
    # "three" starts at character 8: 8 / 14 s = 571 ms, in the second chunk.
    assert layout.index(("word", " three")) > layout.index(("word", " two")) + 1
    assert sum(1 for r in records if "no word timings" in r) == 1


# ---- the cut -----------------------------------------------------------------------------------


async def test_an_interruption_reports_the_played_words_of_the_reply():
    heard = HeardWords(lambda: 12)
    played = ["Once", " upon", " a", " time"]
    frames: list[Frame] = [LLMFullResponseStartFrame()]
    for word in [*played, " there"]:
        frame = TTSTextFrame(word, text_type="word")
        frame.includes_inter_frame_spaces = True
        # Each word's audio as the transport writes it, in 40 ms chunks; the bot's audio stops
        # 40 ms into "there": its start played, but nobody heard the word.
        chunks = 1 if word == " there" else 3 if word == " a" else 8
        frames += [frame, *(_audio(40) for _ in range(chunks))]
    late = TTSTextFrame(" late", text_type="word")  # released as the interruption passed
    frames += [SleepFrame(0.1), InterruptionFrame(), SleepFrame(0.1), late]
    down, _up = await run_test(heard, frames_to_send=frames)
    assert heard.cuts == [(4, 12)]
    assert [f.text for f in down if isinstance(f, TTSTextFrame)] == played
    assert {"once", "upon", "time"} <= heard.recent_words()


async def test_a_word_goes_on_to_the_context_once_its_first_fifth_of_a_second_played():
    heard = HeardWords(lambda: 2)
    word = TTSTextFrame("Hello", text_type="word")
    frames: list[Frame] = [LLMFullResponseStartFrame(), word, *(_audio(40) for _ in range(6))]
    down, _up = await run_test(heard, frames_to_send=[*frames, TTSStoppedFrame()])
    kinds = [type(f) for f in down if isinstance(f, (TTSTextFrame, TTSAudioRawFrame))]
    assert HEARD_AFTER_S == 0.2
    assert kinds == [TTSAudioRawFrame] * 4 + [TTSTextFrame] + [TTSAudioRawFrame] * 2


# ---- the barge-in gate ---------------------------------------------------------------------------


def _turn(*texts: str, final: bool = True) -> list[Frame]:
    """A user turn as the STT adapter passes it on: start, interims, final, end."""
    frames: list[Frame] = [VADUserStartedSpeakingFrame(), UserStartedSpeakingFrame()]
    for text in texts[:-1]:
        frames += [InterimTranscriptionFrame(text, "user", "now"), SleepFrame(0.05)]
    if texts and final:
        frames.append(TranscriptionFrame(texts[-1], "user", "now", finalized=True))
    frames += [SleepFrame(0.05), VADUserStoppedSpeakingFrame(), UserStoppedSpeakingFrame()]
    return [*frames, SleepFrame(0.5 if texts and final else 2.5)]  # (the wait for a final)


async def _gate(
    frames: list[Frame], speaking: bool = True, turn: TurnSettings = GATED, **kwargs: Any
) -> tuple[Any, Any, Any]:
    gate = BargeInGate(turn, **kwargs)
    start = [BotStartedSpeakingFrame()] if speaking else []
    down, up = await run_test(gate, frames_to_send=[*start, *frames])
    return gate, down, up


def _kinds(frames: Any) -> list[type]:
    return [type(f) for f in frames if not isinstance(f, (BotStartedSpeakingFrame,))]


async def test_a_backchannel_while_the_bot_speaks_goes_nowhere():
    gate, down, up = await _gate(_turn("Yeah", "Yeah."))
    assert not any(isinstance(f, InterruptionFrame) for f in [*down, *up])
    assert not any(isinstance(f, (UserStartedSpeakingFrame, TranscriptionFrame)) for f in down)
    assert gate.decisions == [(False, 0, 1, 0)]


async def test_words_of_the_users_own_interrupt_and_the_turn_goes_on():
    gate, down, up = await _gate(_turn("Stop", "Stop, wait."))
    kinds = _kinds(down)
    assert kinds.index(InterruptionFrame) < kinds.index(UserStartedSpeakingFrame)
    assert TranscriptionFrame in kinds and UserStoppedSpeakingFrame in kinds
    assert any(isinstance(f, InterruptionFrame) for f in up)
    assert gate.decisions[0][0] is True


async def test_an_empty_turn_while_the_bot_speaks_leaves_the_reply_alone():
    gate, down, up = await _gate(_turn())  # noise: the VAD fired, the ASR heard nothing
    assert not any(isinstance(f, InterruptionFrame) for f in [*down, *up])
    assert gate.decisions == [(False, 0, 0, 0)]


async def test_a_final_that_comes_after_the_end_still_decides_and_a_dropped_turn_stays_dropped():
    # A slow ASR: the STT gave up holding the end, the final follows; "stop" then confirms.
    late: list[Frame] = [VADUserStartedSpeakingFrame(), UserStartedSpeakingFrame()]
    late += [VADUserStoppedSpeakingFrame(), UserStoppedSpeakingFrame(), SleepFrame(0.5)]
    late += [TranscriptionFrame("Stop.", "user", "now", finalized=True), SleepFrame(0.3)]
    gate, down, _up = await _gate(late)
    assert [d[0] for d in gate.decisions] == [True] and InterruptionFrame in _kinds(down)
    # A backchannel dropped; its late final (after the STT gave up) does not leak on either.
    frames = [*_turn("Yeah", "Yeah.", final=False)[:-1], SleepFrame(2.5)]
    frames += [TranscriptionFrame("Yeah.", "user", "now", finalized=True), SleepFrame(0.3)]
    gate, down, _up = await _gate(frames)
    assert gate.decisions == [(False, 0, 1, 0)]
    assert not any(isinstance(f, (TranscriptionFrame, UserStoppedSpeakingFrame)) for f in down)


async def test_the_bots_echo_heard_back_does_not_interrupt():
    recent = {"a", "friendly", "dragon", "who", "lives"}
    gate, down, _up = await _gate(_turn("A friendly dragon."), recent_bot_words=lambda: recent)
    assert not any(isinstance(f, InterruptionFrame) for f in down)
    assert gate.decisions == [(False, 0, 0, 3)]


async def test_a_turn_while_the_bot_is_silent_interrupts_at_once():
    gate, down, _up = await _gate(_turn("Yeah."), speaking=False)
    kinds = _kinds(down)
    assert kinds[:1] == [VADUserStartedSpeakingFrame] and InterruptionFrame in kinds
    assert TranscriptionFrame in kinds and gate.decisions == []


def _spoken_turn(speech_s: float, *texts: str, turn: TurnSettings) -> list[Frame]:
    """A turn whose speech lasts `speech_s`, as the VAD reports it: its start `vad_start_s` in,
    its stop `vad_stop_s` after the speech; the transcripts come while it speaks."""
    frames: list[Frame] = [VADUserStartedSpeakingFrame(), UserStartedSpeakingFrame()]
    step = (speech_s - turn.vad_start_s) / (len(texts) + 1)
    for i, text in enumerate(texts):
        frames.append(SleepFrame(step))
        if i < len(texts) - 1:
            frames.append(InterimTranscriptionFrame(text, "user", "now"))
        else:
            frames.append(TranscriptionFrame(text, "user", "now", finalized=True))
    frames += [SleepFrame(step + turn.vad_stop_s), VADUserStoppedSpeakingFrame()]
    return [*frames, UserStoppedSpeakingFrame(), SleepFrame(0.5)]


async def test_a_hum_made_words_is_too_short_to_stop_the_bot_and_a_question_is_not():
    # What Whisper tiny makes of a 0.4 s "mm-hm", sure of its words; the VAD says 0.6 s from its
    # start to its stop, which is 0.4 s of speech.
    turn = TurnSettings()
    assert turn.barge_in_min_s > 0.4
    hum = _spoken_turn(0.4, "C'mon", "C'mon, c'mon.", turn=turn)
    gate, down, _up = await _gate(hum, turn=turn)
    assert gate.decisions == [(False, 2, 0, 0)]
    assert not any(isinstance(f, InterruptionFrame) for f in down)
    # The same words said for longer stop the bot, while the user still speaks.
    question = _spoken_turn(1.2, "Come on", "Come on, tell me", "Come on, tell me more.", turn=turn)
    gate, down, _up = await _gate(question, turn=turn)
    assert [d[0] for d in gate.decisions] == [True]
    kinds = _kinds(down)
    assert kinds.index(InterruptionFrame) < kinds.index(VADUserStoppedSpeakingFrame)


async def test_a_short_command_stops_the_bot_unless_it_is_the_bots_own_word():
    turn = TurnSettings()
    # "Wait." in 0.3 s, a word Whisper is seldom sure of: a command stops the bot all the same.
    wait = _spoken_turn(0.3, "Wait.", turn=turn)
    gate, down, _up = await _gate(wait, turn=turn)
    assert [d[0] for d in gate.decisions] == [True] and InterruptionFrame in _kinds(down)
    words = [asr_pb2.Word(text="Wait.", start_ms=4900, end_ms=5200, confidence=0.3)]
    unsure = [
        *wait[:3],
        TranscriptionFrame(
            "Wait.", "user", "now", result=asr_pb2.Transcript(words=words), finalized=True
        ),
        *wait[4:],
    ]
    gate, down, _up = await _gate(unsure, turn=turn, audio_ms=lambda: 5000)
    assert gate.decisions == [(True, 0, 0, 0)]
    # The bot's story said "stop" a moment ago: heard back, it is no command.
    gate, down, _up = await _gate(
        _spoken_turn(0.3, "Stop.", turn=turn), turn=turn, recent_bot_words=lambda: {"stop"}
    )
    assert gate.decisions == [(False, 0, 0, 1)]


async def test_on_a_loudspeaker_only_speech_above_the_floor_makes_a_turn_long():
    # The residual kept the VAD open around a "yeah" for 1 s; 0.3 s of it stood above the floor.
    turn = TurnSettings()
    frames = _spoken_turn(1.0, "Yeah, and then", "And then.", turn=turn)
    gate, down, _up = await _gate(
        frames, turn=turn, floor=lambda since: True, floor_s=lambda since: 0.3
    )
    assert gate.decisions == [(False, 2, 0, 0)]
    assert not any(isinstance(f, InterruptionFrame) for f in down)
    gate, down, _up = await _gate(
        frames, turn=turn, floor=lambda since: True, floor_s=lambda since: 0.8
    )
    assert [d[0] for d in gate.decisions] == [True]


def test_commands_are_found_as_whole_phrases_anywhere_in_the_users_words():
    commands = ("stop", "hold on")
    assert said_any("Oh, hold on a second.", commands)
    assert said_any("STOP!", commands)
    assert not said_any("Hold the door.", commands)  # "hold" alone is no command
    assert not said_any("The bus stops here.", commands)
    assert not said_any("hold on", commands, echo={"hold", "on"})  # the bot's words
    assert said_any("hold on", commands, echo={"hold"})  # only partly the bot's


def _timed(final: bool, *words: tuple[str, int, int, float]) -> Frame:
    """A transcript with word times (ms on the ASR's clock) and confidences."""
    result = asr_pb2.Transcript(
        words=[asr_pb2.Word(text=w, start_ms=a, end_ms=b, confidence=c) for w, a, b, c in words]
    )
    text = " ".join(w[0] for w in words)
    if final:
        return TranscriptionFrame(text, "user", "now", result=result, finalized=True)
    return InterimTranscriptionFrame(text, "user", "now", result=result)


def _timed_turn(*transcripts: Frame) -> list[Frame]:
    frames: list[Frame] = [VADUserStartedSpeakingFrame(), UserStartedSpeakingFrame()]
    for transcript in transcripts:
        frames += [transcript, SleepFrame(0.05)]
    return [*frames, VADUserStoppedSpeakingFrame(), UserStoppedSpeakingFrame(), SleepFrame(0.5)]


# The ASR's utterance began long before the bot's reply, and it heard the bot's echo at 0-0.8 s;
# the user starts at about 5 s on its clock (the VAD's start is at 5 s).
ECHO = (("Once", 0, 400, 0.9), ("upon", 400, 800, 0.9))


async def test_only_the_words_said_since_the_barge_in_began_count_and_reach_the_context():
    frames = _timed_turn(_timed(False, *ECHO), _timed(True, *ECHO))
    gate, down, _up = await _gate(frames, audio_ms=lambda: 5000)
    assert gate.decisions == [(False, 0, 0, 0)]  # the echo before the user's start
    said = (("Stop,", 4800, 5100, 0.9), ("wait.", 5100, 5500, 0.8))
    frames = _timed_turn(_timed(False, *ECHO, said[0]), _timed(True, *ECHO, *said))
    gate, down, _up = await _gate(frames, audio_ms=lambda: 5000)
    assert gate.decisions[0][0] is True
    assert [f.text for f in down if isinstance(f, TranscriptionFrame)] == ["Stop, wait."]


async def test_words_the_asr_is_unsure_of_do_not_stop_the_bot():
    # What Whisper tiny makes of an "mm-hm": a word it is rarely sure of.
    frames = _timed_turn(_timed(True, ("Bumble.", 4800, 5300, 0.4)))
    gate, _down, _up = await _gate(frames, audio_ms=lambda: 5000)
    assert gate.decisions == [(False, 0, 0, 0)]


# ---- the echo reference ------------------------------------------------------------------------


def test_the_echo_reference_schedules_handed_audio_back_to_back_from_its_handover():
    reference = EchoReference()
    reference.start(RATE)
    origin = reference.index(0.0) * -1 / RATE  # the reference's own time zero
    tone = (8000 * np.sin(np.arange(24000) / 24000 * 2 * np.pi * 440)).astype(np.int16)
    # One second at 24 kHz handed over at t = 0.5 s, in two frames: it plays over 0.5..1.5 s.
    reference.handed(tone[:12000].tobytes(), 24000, at=origin + 0.5)
    reference.handed(tone[12000:].tobytes(), 24000, at=origin + 0.6)  # queued behind the first
    assert reference.handed_samples > 0.95 * RATE  # (the resampler holds a few back)

    def block(mic_end_s: float) -> np.ndarray:
        return reference.read(round(mic_end_s * RATE), 160)

    assert not block(0.5).any()  # before the handover: silence
    assert block(0.6).any() and block(1.2).any()  # the tone, where it plays
    assert not block(0.7).any()  # audio the microphone has passed is forgotten
    assert not block(1.7).any()  # after it
    # Handed over after a gap: from the handover, not right after the audio before.
    reference.handed(tone[:2400].tobytes(), 24000, at=origin + 2.0)
    assert not block(1.95).any() and block(2.05).any()


def test_an_interruption_drops_the_reference_the_transport_will_not_play():
    reference = EchoReference()
    reference.start(RATE)
    origin = reference.index(0.0) * -1 / RATE
    tone = np.full(RATE * 2, 8000, dtype=np.int16)
    reference.handed(tone.tobytes(), RATE, at=origin + 1.0)  # plays over 1.0..3.0 s
    reference.interrupted(at=origin + 1.5)
    assert reference.read(round(1.52 * RATE), 160).any()  # the chunk in the transport plays on
    assert not reference.read(round(1.6 * RATE), 160).any()
    assert not reference.read(round(2.5 * RATE), 160).any()
    reference.handed(tone[:RATE].tobytes(), RATE, at=origin + 2.0)  # the next reply: from now
    assert reference.read(round(2.1 * RATE), 160).any()


def test_the_canceller_removes_the_echo_of_handed_audio_with_microphone_frames_in_bursts():
    # The microphone's frames come in bursts (five at once, as after the pipeline's start or a
    # busy moment); the speaker gets its audio 40 ms before it plays, and the room returns it
    # 60 ms later at -10 dB. Counted on from the first burst, the microphone ran ahead of the
    # wall clock and read the reference before it was handed over: no echo was cancelled.
    reference = EchoReference()
    canceller = EchoCanceller(reference)
    canceller._start(RATE)
    rng = np.random.default_rng(7)
    far = (3000 * np.convolve(rng.standard_normal(3 * RATE), np.ones(4) / 4, "same")).astype(
        np.int16
    )
    frame, burst = RATE // 50, 5  # 20 ms frames, five at a time
    lead, delay = RATE * 40 // 1000, RATE * 60 // 1000  # handed -> played -> heard
    gain = 10 ** (-10 / 20)
    begun = time.perf_counter()
    handed = 0
    converged: list[tuple[float, float]] = []  # (echo, what is left of it) after 2 s
    for burst_at in range(0, len(far) - burst * frame, burst * frame):
        while handed < burst_at + burst * frame + lead:  # the speaker is handed its audio
            reference.handed(far[handed : handed + frame].tobytes(), RATE)
            handed += frame
        time.sleep(max(0.0, begun + (burst_at + burst * frame) / RATE - time.perf_counter()))
        for at in range(burst_at, burst_at + burst * frame, frame):
            source = np.arange(at, at + frame) - lead - delay  # what sounds in these samples
            echo = np.where(source >= 0, gain * far[np.maximum(source, 0)], 0.0)
            mic = echo.astype(np.int16).tobytes()
            out = np.frombuffer(canceller._cancel(mic, RATE, 1), dtype=np.int16)
            if at > 2 * RATE:
                converged.append((float(np.mean(echo**2)), float(np.mean(out.astype(float) ** 2))))
    echo_power = sum(e for e, _ in converged)
    left_power = sum(o for _, o in converged)
    assert canceller.blocks > 250
    assert 10 * np.log10(echo_power / max(left_power, 1.0)) > 15  # dB of echo taken out


# ---- pause and resume ----------------------------------------------------------------------------


def _audio(ms: int) -> TTSAudioRawFrame:
    return TTSAudioRawFrame(bytes(2 * RATE * ms // 1000), RATE, 1)


async def test_the_playout_paces_pauses_and_resumes_the_reply_losing_nothing():
    playout = PlayoutGate(lead_s=0.05)

    async def pause_a_while() -> None:
        await asyncio.sleep(0.3)
        playout.pause()
        await asyncio.sleep(0.5)
        playout.resume()

    pausing = asyncio.create_task(pause_a_while())
    frames = [*(_audio(100) for _ in range(8)), SleepFrame(1.6)]
    down, _up = await run_test(playout, frames_to_send=frames)
    await pausing
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert sum(len(f.audio) for f in audio) == 8 * 2 * RATE // 10  # every sample, in order
    assert max(len(f.audio) for f in audio) <= 2 * RATE * PIECE_S  # cut into pieces
    assert len(playout.pauses) == 1 and playout.pauses[0][1] is True


def test_long_audio_is_cut_into_pieces_of_the_same_kind():
    frame = _audio(50)
    cut = pieces(frame, 0.02)
    assert [len(p.audio) for p in cut] == [640, 640, 320]
    assert all(isinstance(p, TTSAudioRawFrame) and p.sample_rate == RATE for p in cut)
    assert len(pieces(_audio(10), 0.02)) == 1


class _LateSpeaker(FrameProcessor):
    """A test double of an output transport that plays audio at half speed and, like Pipecat's,
    pushes each frame on once written."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            await asyncio.sleep(2 * len(frame.audio) / 2 / frame.sample_rate)
        await self.push_frame(frame, direction)


async def test_a_pause_stops_a_late_transport_within_the_lead():
    playout = PlayoutGate(lead_s=0.05)
    speaker = _LateSpeaker()
    written: list[float] = []
    paused_at: list[float] = []

    async def pause_soon() -> None:
        await asyncio.sleep(0.6)
        paused_at.append(asyncio.get_running_loop().time())
        playout.pause()
        await asyncio.sleep(0.5)
        playout.resume()  # (the barge-in gate's timeout would)

    class _Clock(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                written.append(asyncio.get_running_loop().time())
            await self.push_frame(frame, direction)

    pausing = asyncio.create_task(pause_soon())
    pipeline = Pipeline([playout, speaker, PlayoutAck(playout), _Clock()])
    await run_test(pipeline, frames_to_send=[_audio(400), SleepFrame(1.2)])
    await pausing
    after = [t for t in written if paused_at[0] < t < paused_at[0] + 0.5]
    # Played on after the pause: the lead and the piece in the speaker, at half speed.
    assert len(after) * PIECE_S <= 0.05 + 2 * PIECE_S, (len(after), len(written))
    before = [t for t in written if t <= paused_at[0]]
    assert len(before) * PIECE_S < 0.4  # in 0.6 s at half speed: the gate waited for it


async def test_an_interruption_clears_a_paused_playout():
    playout = PlayoutGate(lead_s=0.05)
    playout.pause()
    frames = [*(_audio(100) for _ in range(3)), SleepFrame(0.2), InterruptionFrame()]
    down, _up = await run_test(playout, frames_to_send=frames)
    assert not any(isinstance(f, TTSAudioRawFrame) for f in down)
    assert not playout.paused and playout.pauses[0][1] is False


async def test_a_held_turn_pauses_the_bot_and_a_false_one_resumes_it():
    playout = PlayoutGate()
    gate, down, _up = await _gate(_turn("Mm-hm."), playout=playout)
    assert gate.decisions == [(False, 0, 1, 0)]
    assert not playout.paused and playout.pauses and playout.pauses[0][1] is False  # nothing held
    assert not any(isinstance(f, InterruptionFrame) for f in down)


async def test_a_pause_with_no_confirming_words_ends_after_the_timeout():
    playout = PlayoutGate()
    gate = BargeInGate(
        TurnSettings(barge_in_min_words=1, false_interruption_timeout_s=0.2), playout=playout
    )
    frames = [BotStartedSpeakingFrame(), VADUserStartedSpeakingFrame(), UserStartedSpeakingFrame()]
    await run_test(gate, frames_to_send=[*frames, SleepFrame(0.6)])
    assert not playout.paused and len(playout.pauses) == 1
    assert gate.decisions == []  # the turn itself is still undecided


async def test_on_a_loudspeaker_words_below_the_echo_floor_only_pause_the_bot():
    # The canceller's residual, made words by the ASR: it never passed the floor.
    playout = PlayoutGate()
    gate, down, _up = await _gate(
        _turn("Stop", "Stop, wait."), playout=playout, floor=lambda since: False
    )
    assert gate.decisions == [(False, 2, 0, 0)]
    assert not any(isinstance(f, InterruptionFrame) for f in down)
    assert not playout.paused and len(playout.pauses) == 1  # paused at once, then resumed
    # Loud speech before the turn's onset (the bot's last word, say) does not count either.
    before = time.monotonic() - 1.0
    gate, down, _up = await _gate(_turn("Stop", "Stop, wait."), floor=lambda since: before >= since)
    assert [d[0] for d in gate.decisions] == [False]


async def test_on_a_loudspeaker_the_barge_in_is_confirmed_once_the_speech_passes_the_floor():
    passed_at = time.monotonic() + 0.3  # the user's speech passes the floor 0.3 s in
    frames: list[Frame] = [VADUserStartedSpeakingFrame(), UserStartedSpeakingFrame()]
    frames += [InterimTranscriptionFrame("Stop, wait", "user", "now"), SleepFrame(0.6)]
    frames += [VADUserStoppedSpeakingFrame(), UserStoppedSpeakingFrame(), SleepFrame(2.5)]
    gate, down, _up = await _gate(
        frames, floor=lambda since: time.monotonic() >= passed_at >= since
    )
    assert [d[0] for d in gate.decisions] == [True]
    kinds = _kinds(down)
    # Confirmed while the user still spoke (the floor is watched), not at the turn's end.
    assert kinds.index(InterruptionFrame) < kinds.index(VADUserStoppedSpeakingFrame)


async def test_the_floor_analyzer_tells_loud_speech_from_a_quiet_residual():
    from bots.echo_floor import FloorVADAnalyzer

    speech = np.frombuffer(speech_pcm("Wait, what about the weather tomorrow?"), np.int16)

    async def passed(gain: float) -> tuple[bool, float]:
        analyzer = FloorVADAnalyzer(params=vad_params(TurnSettings(), floored=False))
        analyzer.set_sample_rate(RATE)
        start = time.monotonic()
        states = set()
        pcm = (speech * gain).astype(np.int16).tobytes()
        for at in range(0, len(pcm), 640):
            states.add(await analyzer.analyze_audio(pcm[at : at + 640]))
        await analyzer.cleanup()
        assert VADState.SPEAKING in states  # the quick VAD hears both
        return analyzer.passed_since(start), analyzer.loud_s_since(start)

    loud, loud_s = await passed(1.0)
    speech_s = len(speech) / RATE
    assert loud and 0.5 * speech_s < loud_s <= speech_s  # its voiced part, not its silence
    # -40 dB: what the canceller leaves of a -20 dB echo, say.
    assert await passed(0.01) == (False, 0.0)


def test_the_echo_floor_judges_barge_ins_only_where_the_bot_cancels_echo():
    from bots.echo_floor import FloorVADAnalyzer
    from bots.pipeline import vad_analyzer

    def thresholds(analyzer: Any) -> tuple[float, float, float]:
        params = analyzer.params
        return (params.confidence, params.start_secs, params.min_volume)

    quick = (0.6, 0.1, 0.3)
    speaker = vad_analyzer(TurnSettings(), cancelling_echo=True)
    assert isinstance(speaker, FloorVADAnalyzer) and thresholds(speaker) == quick
    assert (speaker.floor.confidence, speaker.floor.start_secs) == ECHO_FLOOR[:2]
    headset = vad_analyzer(TurnSettings(), cancelling_echo=False)
    assert not isinstance(headset, FloorVADAnalyzer) and thresholds(headset) == quick
    unfloored = vad_analyzer(TurnSettings(echo_vad_floor=False), cancelling_echo=True)
    assert not isinstance(unfloored, FloorVADAnalyzer) and thresholds(unfloored) == quick
    # Without the barge-in rules nothing judges a barge-in: the floor holds the VAD's start.
    ungated = vad_analyzer(
        TurnSettings(barge_in_min_words=0, barge_in_min_s=0.0), cancelling_echo=True
    )
    assert not isinstance(ungated, FloorVADAnalyzer) and thresholds(ungated) == ECHO_FLOOR


def test_the_vad_starts_quickly_unless_held_to_the_echo_floor():
    quick = vad_params(TurnSettings(), floored=False)
    assert (quick.confidence, quick.start_secs, quick.min_volume) == (0.6, 0.1, 0.3)
    floored = vad_params(TurnSettings(), floored=True)
    assert (floored.confidence, floored.start_secs, floored.min_volume) == ECHO_FLOOR
    strict = vad_params(TurnSettings(vad_confidence=0.9), floored=True)
    assert strict.confidence == 0.9  # a stricter setting stands
