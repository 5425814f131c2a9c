"""The GPU benchmark's TTS part: Magpie through our backend at C concurrent streams.

It drives `MagpieTtsBackend.synthesize` in STREAM mode, C jobs at once, with the backend's own
chunked codec decoding (the first audio after `chunk_frames` frames), and measures each job's
time to first audio chunk and real-time factor (synthesis wall time over the audio's length).
The backend runs generation on one GPU thread, one synthesis at a time (NeMo keeps the local
transformer's cache on the model), so concurrent jobs queue: the figures show what that costs.

Random weights never sample the end-of-audio token (the benchmark forbids it outright, so every
job is exactly `max_decoder_steps` frames): the decoder's length is bounded by that setting.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.stats import percentile
from services.tts.backend import SynthesisJob, SynthesisMode, samples_of
from services.tts.backends.magpie import MagpieTtsBackend

TEXT = "The quick brown fox jumps over the lazy dog, then it naps in the warm afternoon sun."
#: The longest one synthesis may take before the benchmark gives up on the point.
JOB_DEADLINE_S = 300.0


@dataclass
class TtsPoint:
    """C concurrent STREAM syntheses of the same bounded length."""

    concurrency: int
    frames_per_job: int
    audio_s_per_job: float = 0.0
    ttfa_ms_p50: float = 0.0
    ttfa_ms_p95: float = 0.0
    rtf_p50: float = 0.0
    rtf_p95: float = 0.0
    wall_s: float = 0.0
    realtime_streams: float = 0.0  # audio seconds made per wall second, all jobs together
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        """For the JSON output."""
        return asdict(self)


async def _job(backend: MagpieTtsBackend, voice: int) -> tuple[float, float, int]:
    """One STREAM synthesis: seconds to the first chunk, seconds in all, samples."""
    job = SynthesisJob(
        TEXT, backend.voices[voice % len(backend.voices)], "en", SynthesisMode.STREAM
    )
    started = time.perf_counter()
    first = 0.0
    samples = 0
    async for item in backend.synthesize(job):
        size = samples_of(item).size  # a piece may carry word times and no audio
        if size and not samples:
            first = time.perf_counter() - started
        samples += size
    return first, time.perf_counter() - started, samples


async def measure(backend: MagpieTtsBackend, concurrency: int, frames: int) -> TtsPoint:
    """C jobs submitted at once; TTFA and RTF over the jobs."""
    point = TtsPoint(concurrency, frames)
    rate = backend.voices[0].sample_rate_hz
    started = time.perf_counter()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(_job(backend, n) for n in range(concurrency))), JOB_DEADLINE_S
        )
    except TimeoutError:
        point.error = f"the jobs took over {JOB_DEADLINE_S:g} s"
        return point
    point.wall_s = time.perf_counter() - started
    audio = [samples / rate for _, _, samples in results]
    if min(audio) <= 0:
        point.error = "a job produced no audio"
        return point
    ttfa = [1000 * first for first, _, _ in results]
    rtf = [total / seconds for (_, total, _), seconds in zip(results, audio, strict=True)]
    point.audio_s_per_job = sum(audio) / len(audio)
    point.ttfa_ms_p50, point.ttfa_ms_p95 = percentile(ttfa, 50), percentile(ttfa, 95)
    point.rtf_p50, point.rtf_p95 = percentile(rtf, 50), percentile(rtf, 95)
    point.realtime_streams = sum(audio) / point.wall_s
    return point


class PrebuiltMagpie(MagpieTtsBackend):
    """The backend around a model built in this process (no .nemo round trip of 1.2 GB).

    Only where the model comes from differs: `load` still attaches it with the backend's own
    `attach` (which wraps its frame loop) on the backend's GPU thread, then warms it up.
    """

    def __init__(self, model: Any, device: str, chunk_frames: int) -> None:
        super().__init__("random-weight magpie_tts_multilingual_357m", device, chunk_frames)
        self._prebuilt = model

    def _load(self) -> None:
        self.attach(self._prebuilt.to(self.device))
        self._prebuilt = None


async def loaded_backend(model: Any, device: str, chunk_frames: int) -> MagpieTtsBackend:
    """The real backend around the random-weight model, loaded and warmed up.

    The backend's own warm-up is one BATCH synthesis; one STREAM job more brings in the chunked
    decoding's shapes (kernel selection on a GPU), so that the first timed job does not pay it.
    """
    backend = PrebuiltMagpie(model, device, chunk_frames)
    await backend.load()
    await asyncio.wait_for(_job(backend, 0), JOB_DEADLINE_S)
    return backend
