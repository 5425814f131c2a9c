"""The WAV microphone: queued speech plays in order, and a full queue makes `say` wait."""

from __future__ import annotations

import asyncio

import pytest
from pipecat.frames.frames import InputAudioRawFrame

from bots.wav_transport import FRAME_MS, MAX_QUEUED_UTTERANCES, WavFileTransport
from tests.adapter_bench import RATE, bench

FRAME_BYTES = RATE * FRAME_MS // 1000 * 2


def utterance(mark: int) -> bytes:
    """One frame of speech whose every byte is `mark`, to tell utterances apart when played."""
    return bytes([mark]) * FRAME_BYTES


@pytest.mark.timeout(20)
async def test_say_waits_while_the_queue_is_full_and_nothing_queued_is_dropped():
    microphone = WavFileTransport().input()
    for mark in range(1, MAX_QUEUED_UTTERANCES + 1):
        await microphone.say(utterance(mark))
    one_more = asyncio.create_task(microphone.say(utterance(MAX_QUEUED_UTTERANCES + 1)))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not one_more.done()  # no room until the microphone takes the next utterance

    async with bench(microphone) as b:
        await asyncio.wait_for(one_more, 5)
        await b.down.wait_for(
            InputAudioRawFrame, 5, count=MAX_QUEUED_UTTERANCES + 1, where=lambda f: any(f.audio)
        )
    spoken = [frame.audio[0] for frame in b.down.all(InputAudioRawFrame) if any(frame.audio)]
    assert spoken == list(range(1, MAX_QUEUED_UTTERANCES + 2))
