"""The GPU benchmark's ASR part: our batched stream step at N concurrent streams.

It drives the Parakeet backend itself (`ParakeetAsrBackend.step`, so our `StepBatcher` and our
`_forward`: caches stacked, one `conformer_stream_step`, caches split again) with N streams that
each submit one chunk per step, and times the step from the first submission to the last
stream's completion: the latency every stream sees for that chunk. The chunks are cut by our
`ChunkCursor` from random mel frames already on the device (where `IncrementalFeatures` leaves
them), so the features' own cost is not in the figure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch  # type: ignore[import-not-found, unused-ignore]

from loadtest.gpu_bench_models import ASR_TOKENS_PER_FRAME
from loadtest.stats import percentile
from services.asr.backends.parakeet import ENCODER_FRAME_S, ParakeetAsrBackend, StreamState
from services.asr.backends.parakeet_stream import Chunk

#: Distinct chunk sequences the streams cycle through (so that their tokens differ).
SEQUENCES = 8
#: The longest one batched step may take before the benchmark gives up on it.
STEP_DEADLINE_S = 120.0


@dataclass
class AsrPoint:
    """The batched step at one stream count and right context."""

    right_context: int
    chunk_ms: float
    streams: int
    steps: int = 0
    step_ms_p50: float = 0.0
    step_ms_p95: float = 0.0
    step_ms_max: float = 0.0
    forwards_per_step: float = 0.0
    tokens_per_frame: float = 0.0
    state_mib_per_stream: float | None = None  # caches and hypothesis kept between steps
    peak_mib_per_stream: float | None = None  # the peak during steps, activations included
    error: str = ""

    @property
    def within_chunk(self) -> bool:
        """The step's p95 is under the chunk's duration (the stream keeps up with real time)."""
        return not self.error and self.step_ms_p95 < self.chunk_ms

    def as_dict(self) -> dict[str, Any]:
        """For the JSON output."""
        return {**asdict(self), "within_chunk": self.within_chunk}


@dataclass
class AsrCapacity:
    """The most streams whose p95 step stays under the chunk duration, and how it was found."""

    right_context: int
    chunk_ms: float
    max_streams: int
    first_failing: int | None  # the fewest streams seen over the bound (None: none seen)
    probes: list[AsrPoint] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """For the JSON output."""
        return {**asdict(self), "probes": [p.as_dict() for p in self.probes]}


def chunk_ms(right_context: int) -> float:
    """Audio per steady-state chunk: (right_context + 1) encoder frames of 80 ms."""
    return 1000 * ENCODER_FRAME_S * (right_context + 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(value: float) -> float:
    return value / 2**20


def use_context(backend: ParakeetAsrBackend) -> None:
    """Set the shared model's attention context to this backend's right context.

    A server loads one right context per process; the benchmark keeps one backend per right
    context around one model, and the context is the encoder's (so is the chunking it implies).
    """
    encoder = backend.model.encoder
    chosen = next(c for c in encoder.att_context_size_all if c[1] == backend.right_context)
    encoder.set_default_att_context_size(list(chosen))


def chunk_sequences(backend: ParakeetAsrBackend, steps: int) -> list[list[Chunk]]:
    """SEQUENCES lists of `steps` chunks each (the first an utterance's first chunk)."""
    generator = torch.Generator().manual_seed(1)
    model = backend.model
    features = int(model.encoder._feat_in)
    sequences = []
    for _ in range(SEQUENCES):
        cursor = backend.new_cursor()
        if cursor.shift_size[1] != 8 * (backend.right_context + 1):  # mel frames a chunk
            raise RuntimeError(f"the encoder is not at right context {backend.right_context}")
        frames = cursor.chunk_size[0] + cursor.shift_size[1] * (steps - 1)
        noise = torch.randn((features, frames), generator=generator).to(backend.device)
        chunks = cursor.push(noise)
        assert len(chunks) == steps, (len(chunks), steps)
        sequences.append(chunks)
    return sequences


class StepCounter:
    """Wraps the batcher's forward pass: how many passes ran (one per group of streams)."""

    def __init__(self, forward: Callable[[list[Any]], None]) -> None:
        self.forward = forward
        self.passes = 0

    def __call__(self, group: list[Any]) -> None:
        self.passes += 1
        self.forward(group)


async def run_steps(
    backend: ParakeetAsrBackend, streams: int, warmup: int, steps: int
) -> tuple[list[float], float, list[StreamState]]:
    """Step `streams` fresh streams `warmup + steps` times after their first chunk.

    Returns the timed steps' seconds, the forward passes per timed step, and the states.
    """
    assert backend._batcher is not None, "load() first"
    await backend._on_model_thread(use_context, backend)
    sequences = chunk_sequences(backend, 1 + warmup + steps)
    states: list[StreamState] = [await backend._on_model_thread(backend.new_state)]
    for _ in range(streams - 1):
        states.append(await backend._on_model_thread(backend.new_state))
    counter = StepCounter(backend._batcher.forward)
    backend._batcher.forward = counter
    times: list[float] = []
    try:
        for index in range(1 + warmup + steps):  # the first chunk is always untimed
            started = time.perf_counter()
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        backend.step(state, sequences[n % SEQUENCES][index])
                        for n, state in enumerate(states)
                    )
                ),
                STEP_DEADLINE_S,
            )
            _sync(backend.device)
            if index > warmup:
                times.append(time.perf_counter() - started)
            if index == warmup:
                counter.passes = 0
    finally:
        backend._batcher.forward = counter.forward
    return times, counter.passes / max(1, len(times)), states


async def measure(backend: ParakeetAsrBackend, streams: int, warmup: int, steps: int) -> AsrPoint:
    """One point: the timed steps' latency, memory per stream, and tokens emitted."""
    point = AsrPoint(backend.right_context, chunk_ms(backend.right_context), streams)
    device = backend.device
    cuda = device.type == "cuda"
    states: list[StreamState] = []
    try:
        if cuda:
            _sync(device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times, passes, states = await run_steps(backend, streams, warmup, steps)
        if cuda:
            _sync(device)
            point.state_mib_per_stream = _mib(torch.cuda.memory_allocated(device) - base) / streams
            point.peak_mib_per_stream = _mib(torch.cuda.max_memory_allocated(device) - base) / (
                streams
            )
    except torch.cuda.OutOfMemoryError:
        point.error = "out of GPU memory"
        return point
    except TimeoutError:
        point.error = f"a step took over {STEP_DEADLINE_S:g} s"
        return point
    finally:
        del states[:]
        if cuda:
            torch.cuda.empty_cache()
    milliseconds = [1000 * t for t in times]
    point.steps = len(milliseconds)
    point.step_ms_p50 = percentile(milliseconds, 50)
    point.step_ms_p95 = percentile(milliseconds, 95)
    point.step_ms_max = max(milliseconds)
    point.forwards_per_step = passes
    return point


def _tokens(states: list[StreamState]) -> int:
    return sum(len(s.tokens) for s in states)


async def tune_emission(
    backend: ParakeetAsrBackend, target: float = ASR_TOKENS_PER_FRAME, rounds: int = 10
) -> float:
    """Shift the joint's blank logit until the random model emits about `target` tokens a frame.

    Random weights emit a token almost every frame (blank is one class of 1025), which would make
    the greedy decoder's loop run to `max_symbols` on every frame: far costlier than speech. The
    shift is bisected on a few steps of 16 streams; the rate it reaches is returned.
    """
    bias = backend.model.joint.joint_net[-1].bias
    blank = bias.numel() - 1
    original = float(bias[blank])
    low, high = -10.0, 60.0
    rate = 0.0
    steps = 4
    frames = (backend.right_context + 1) * steps  # after the first chunk, which is discounted
    for _ in range(rounds):
        middle = (low + high) / 2
        with torch.no_grad():
            bias[blank] = original + middle
        _, _, states = await run_steps(backend, 16, 0, steps)
        first = await _first_chunk_tokens(backend)
        rate = max(0.0, _tokens(states) / 16 - first) / frames
        if rate > target:
            low = middle
        else:
            high = middle
    return rate


async def _first_chunk_tokens(backend: ParakeetAsrBackend) -> float:
    """Tokens per stream after the first chunk alone (taken off the rate's count)."""
    _, _, states = await run_steps(backend, 16, 0, 0)
    return _tokens(states) / 16


async def loaded_backend(
    model: Any, right_context: int, device: str, max_batch: int
) -> ParakeetAsrBackend:
    """The real backend around the random model, loaded (warm-up included)."""
    backend = ParakeetAsrBackend(
        "random-weight nemotron-speech-streaming-en-0.6b",
        right_context=right_context,
        device=device,
        max_batch=max_batch,
        asr_model=model,
    )
    await backend.load()
    return backend


async def capacity(
    backend: ParakeetAsrBackend,
    points: list[AsrPoint],
    warmup: int,
    steps: int,
    cap: int,
    probes: int,
    in_budget: Callable[[], bool],
) -> AsrCapacity:
    """The most streams whose p95 step is within the chunk duration.

    From the points already measured: doubling past the largest passing count (up to `cap`),
    then bisection to about 10 %, at most `probes` new points.
    """
    passing = [p.streams for p in points if p.within_chunk]
    failing = [p.streams for p in points if not p.within_chunk]
    low = max(passing, default=0)
    high = min((n for n in failing if n > low), default=None)
    result = AsrCapacity(backend.right_context, chunk_ms(backend.right_context), low, high)
    while len(result.probes) < probes and in_budget():
        if high is None:
            if low >= cap:
                break
            trial = min(cap, max(1, low * 2))
        else:
            if high - low <= max(1, low // 10):
                break
            trial = (low + high) // 2
        point = await measure(backend, trial, warmup, steps)
        result.probes.append(point)
        if point.within_chunk:
            low = trial
        else:
            high = trial
    result.max_streams, result.first_failing = low, high
    return result
