"""NeMo Magpie TTS (nvidia/magpie_tts_multilingual_357m) on the GPU: the `nemo` extra.

Magpie is an encoder-decoder transformer that predicts codec frames autoregressively (about 46 ms
of audio per frame); a neural audio codec turns frames into audio. NeMo's `generate_speech` runs
the whole frame loop of a text chunk in one call, so this backend observes it per frame through
two of the model's per-frame methods (`_check_eos_and_update_state` sees every new frame,
`_should_terminate_loop` can end the loop), wrapped once at load. The wrappers find the running
synthesis through a thread-local, so streams never see each other's frames.

STREAM mode decodes the frames in small overlapping chunks (`FrameDecoder`): each chunk is decoded
with a few frames of left context, and the held-back tail of one chunk is crossfaded with the head
of the next, so the first audio comes after `stream_chunk_frames` frames with no clicks at chunk
seams. BATCH mode decodes the whole segment at once. A cancel sets a flag that the loop checks
between frames. Generation is serialised on one GPU thread (NeMo keeps the local transformer's
cache on the model), and the codec's true output rate is read from the model, not assumed.

Word times are estimated (`WORD_TIMING_SOURCE_ESTIMATED`): NeMo's generation loop does not expose
its text-to-audio alignment. BATCH mode shares the segment's audio out among its words by their
length; STREAM mode, which must place a word before the audio's length is known, predicts starts
from a speaking pace (`PacedWords`), and the last chunk of the job takes the words left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from services.runtime.audio import FloatAudio, duration_ms
from services.runtime.errors import ResourceExhausted
from services.tts.backend import SynthesisJob, SynthesisMode, TimedAudio, TtsBackend, Voice
from services.tts.settings import TtsSettings
from services.tts.words import PacedWords, TimingSource, estimate_word_times

try:
    import torch
    from nemo.collections.tts.models import MagpieTTSModel  # type: ignore[import-untyped]
    from nemo.collections.tts.parts.utils.tts_dataset_utils import (  # type: ignore[import-untyped]
        chunk_text_for_inference,
        get_tokenizer_for_language,
    )
except ImportError as err:
    raise ImportError(
        f"the magpie backend needs NeMo and torch ({err}): pip install 'nemotron-speech-mesh[nemo]'"
    ) from err

log = logging.getLogger(__name__)

DEFAULT_MODEL = "nvidia/magpie_tts_multilingual_357m"
#: The baked speakers of magpie_tts_multilingual_357m, by speaker index (from its model card).
SPEAKERS = ("john", "sofia", "aria", "jason", "leo")
LANGUAGES = ("en", "es", "de", "fr", "vi", "it", "zh")
#: Frames of already-emitted audio decoded again before each chunk (the codec's receptive field).
CONTEXT_FRAMES = 2
#: Frames whose audio is held back at the end of a chunk and crossfaded with the next one.
OVERLAP_FRAMES = 1
#: Fewest frames the codec decodes: its decoder's first convolution pads 3 frames each side
#: (NeMo's `min_generated_frames` of 4 "lines up with the codec's minimum frame requirement").
MIN_DECODE_FRAMES = 4
#: STREAM mode: audio chunks a synthesis may run ahead of its reader. At the default 4 frames
#: (186 ms) a chunk that is about 12 s of audio, 1 MB: a reader that is sending to its client
#: never fills it, so the GPU thread (which every stream shares) waits only for a reader that
#: has stopped reading (its client's flow-control window and the session's outbox are full).
AUDIO_QUEUE_CHUNKS = 64
#: How long the GPU thread waits for a reader that has fallen `AUDIO_QUEUE_CHUNKS` behind before
#: it stops that synthesis (RESOURCE_EXHAUSTED for its stream), so that one client that stopped
#: reading cannot hold up every other stream on the shared thread for longer.
READER_STALL_S = 5.0
_STALLED = np.zeros(
    0, dtype=np.float32
)  # the end marker of a synthesis stopped for a stalled reader


class FrameDecoder:
    """Turns a growing sequence of codec frames into audio, chunk by chunk, with crossfades.

    `decode` maps frames (codebooks x T int array) to audio; it must give the same number of
    samples for every frame. Each chunk decodes its new frames plus `context` earlier ones (more
    when needed to reach `min_frames`), emits everything but the last `overlap` frames, and
    holds those back to crossfade (linearly) with the same frames of the next chunk. `flush`
    emits the rest.
    """

    def __init__(
        self,
        decode: Callable[[np.ndarray], FloatAudio],
        chunk_frames: int,
        context: int = CONTEXT_FRAMES,
        overlap: int = OVERLAP_FRAMES,
        min_frames: int = MIN_DECODE_FRAMES,
    ) -> None:
        if chunk_frames <= overlap:
            raise ValueError("chunk_frames must exceed the overlap")
        self.decode = decode
        self.chunk_frames = chunk_frames
        self.context = context
        self.overlap = overlap
        self.min_frames = min_frames
        self.frames: list[np.ndarray] = []
        self.decoded_to = 0  # frames covered by emitted audio or the held-back tail
        self.tail = np.zeros(0, dtype=np.float32)

    def push(self, frame: np.ndarray) -> FloatAudio | None:
        """Add one frame (a codebook vector); audio when a chunk is complete."""
        self.frames.append(np.asarray(frame).reshape(-1))
        if len(self.frames) - self.decoded_to >= self.chunk_frames:
            return self._chunk(final=False)
        return None

    def flush(self) -> FloatAudio:
        """Audio of every frame not yet emitted (the end of the segment)."""
        if len(self.frames) == self.decoded_to and not self.tail.size:
            return np.zeros(0, dtype=np.float32)
        return self._chunk(final=True)

    def _chunk(self, final: bool) -> FloatAudio:
        end = len(self.frames)
        held = self.overlap if self.decoded_to else 0  # frames of the tail, before decoded_to
        # More left context where the window would be too short for the codec (the flush).
        start = max(0, min(self.decoded_to - held - self.context, end - self.min_frames))
        audio = self.decode(np.stack(self.frames[start:end], axis=1))
        per_frame = audio.size // (end - start)
        new = audio[(self.decoded_to - held - start) * per_frame :]
        if self.tail.size:
            fade = min(self.tail.size, new.size)
            ramp = np.linspace(0.0, 1.0, fade, endpoint=False, dtype=np.float32)
            head = self.tail[:fade] * (1 - ramp) + new[:fade] * ramp
            new = np.concatenate([head, new[fade:]])
        keep = 0 if final else self.overlap * per_frame
        self.tail = new[new.size - keep :] if keep else np.zeros(0, dtype=np.float32)
        self.decoded_to = end
        return new[: new.size - keep].astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Last:
    """The last audio of a streamed synthesis (the decoder's flush)."""

    samples: FloatAudio


class _Synthesis:
    """One running synthesis as the frame loop sees it (lives on the GPU thread)."""

    def __init__(self, on_frame: Callable[[np.ndarray], None], codebook_size: int) -> None:
        self.on_frame = on_frame
        self.codebook_size = codebook_size
        self.cancelled = threading.Event()
        self.ended = False

    def frames(self, codes: Any) -> None:
        """Codes of one step, (1, codebooks, stacked frames); special tokens end the audio."""
        for frame in codes[0].detach().cpu().numpy().T:
            if self.ended or (frame >= self.codebook_size).any():
                self.ended = True
                return
            self.on_frame(frame)


_running = threading.local()


class MagpieTtsBackend(TtsBackend):
    """Magpie TTS with its five baked voices, one model shared by every stream.

    Args:
        model: A .nemo file, or a hub name (only when the hub is reachable).
        device: "cuda", "cpu" or "auto" (CUDA when available).
        chunk_frames: STREAM mode: frames decoded per audio chunk.
    """

    name = "magpie"

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", chunk_frames: int = 4):
        self.model_ref = model or DEFAULT_MODEL
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.chunk_frames = chunk_frames
        self._model: Any = None
        self._rate = 0
        self._speakers: tuple[str, ...] = SPEAKERS
        self._gpu = ThreadPoolExecutor(1, thread_name_prefix="magpie")

    @classmethod
    def from_settings(cls, settings: TtsSettings) -> Self:
        """The model at `settings.model` (default: the hub name) on `settings.device`."""
        return cls(settings.model, settings.device, settings.stream_chunk_frames)

    @property
    def model_name(self) -> str:
        """E.g. "magpie_tts_multilingual_357m"."""
        return Path(self.model_ref).name.removesuffix(".nemo")

    @property
    def voices(self) -> Sequence[Voice]:
        """The baked speakers, each speaking every language, at the codec's output rate."""
        return tuple(Voice(name, LANGUAGES, self._rate) for name in self._speakers)

    async def load(self) -> None:
        """Restore the model, wrap its frame loop, read the codec rate, and warm up."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._gpu, self._load)
        await loop.run_in_executor(self._gpu, self._generate, "Hello.", "en", 0, None)

    def _load(self) -> None:
        if Path(self.model_ref).is_file():
            model = MagpieTTSModel.restore_from(self.model_ref, map_location=self.device)
        else:
            model = MagpieTTSModel.from_pretrained(self.model_ref, map_location=self.device)
        self.attach(model)

    def attach(self, model: Any) -> None:
        """Use an already restored MagpieTTSModel (wraps its per-frame methods)."""
        model.eval()
        check = model._check_eos_and_update_state
        terminate = model._should_terminate_loop

        def check_and_publish(chunk_state: Any, codes: Any, *args: Any, **kwargs: Any) -> None:
            check(chunk_state, codes, *args, **kwargs)
            synthesis: _Synthesis | None = getattr(_running, "synthesis", None)
            if synthesis is not None:
                synthesis.frames(codes)

        def terminate_or_cancel(*args: Any, **kwargs: Any) -> bool:
            synthesis: _Synthesis | None = getattr(_running, "synthesis", None)
            if synthesis is not None and (synthesis.cancelled.is_set() or synthesis.ended):
                return True
            return bool(terminate(*args, **kwargs))

        model._check_eos_and_update_state = check_and_publish
        model._should_terminate_loop = terminate_or_cancel
        self._model = model
        # The rate the codec's decoder writes; the usual code assumes 22000 Hz.
        self._rate = int(model.output_sample_rate)
        baked = int(model.num_baked_speakers) if model.has_baked_context_embedding else 0
        self._speakers = SPEAKERS[: baked or 1]
        log.info("magpie %s on %s: %d Hz", self.model_name, self.device, self._rate)

    async def aclose(self) -> None:
        """Stop the GPU thread and drop the model."""
        self._gpu.shutdown(wait=False, cancel_futures=True)
        self._model = None

    async def synthesize(self, job: SynthesisJob) -> AsyncGenerator[TimedAudio, None]:
        """STREAM: audio every few frames. BATCH: the segment's audio in one piece.

        Each piece carries the estimated times of the job's words that start in it.
        """
        if self._model is None:
            raise RuntimeError("the magpie backend is not loaded")
        if not job.text.strip():
            return
        loop = asyncio.get_running_loop()
        room = AUDIO_QUEUE_CHUNKS
        rate = self._rate
        words = job.text.split()
        # One place more than the credits: the stalled-reader marker always fits.
        audio: asyncio.Queue[FloatAudio | _Last | None] = asyncio.Queue(room + 1)
        # One credit per entry on its way to the reader: the GPU thread takes one before each
        # put and the reader gives it back after each get, so the thread waits while the reader
        # is `room` entries behind (back-pressure) and a put never finds the queue full.
        credits = threading.Semaphore(room)
        speaker = self._speakers.index(job.voice.name)
        language = job.language.split("-")[0].lower()
        synthesis = _Synthesis(lambda frame: None, 0)

        def deliver(samples: FloatAudio | _Last | None) -> None:  # on the GPU thread
            if synthesis.cancelled.is_set():
                return  # the reader has gone; nothing waits for this
            if not credits.acquire(timeout=READER_STALL_S):
                synthesis.cancelled.set()  # the generation loop stops at the next frame
                if not loop.is_closed():
                    loop.call_soon_threadsafe(audio.put_nowait, _STALLED)
                return
            if synthesis.cancelled.is_set() or loop.is_closed():
                return  # it went while this waited for room
            loop.call_soon_threadsafe(audio.put_nowait, samples)

        stream = deliver if job.mode is SynthesisMode.STREAM else None
        work = loop.run_in_executor(
            self._gpu, self._generate, job.text, language, speaker, stream, synthesis
        )
        try:
            if stream is None:
                whole = await work
                if whole.size:
                    estimate = estimate_word_times(words, duration_ms(whole.size, rate))
                    yield TimedAudio(whole, tuple(estimate), TimingSource.ESTIMATED)
                return
            paced = PacedWords(words)
            while (item := await audio.get()) is not None:
                if item is _STALLED:
                    raise ResourceExhausted(
                        f"the client read none of {room} audio chunks for {READER_STALL_S:g} s; "
                        "its synthesis was stopped so that other streams could go on"
                    )
                credits.release()
                last = isinstance(item, _Last)
                samples = item.samples if isinstance(item, _Last) else item
                times = paced.take(duration_ms(samples.size, rate), last=last)
                if samples.size or times:
                    yield TimedAudio(samples, times, TimingSource.ESTIMATED)
            await work
        finally:
            synthesis.cancelled.set()  # between frames, the loop ends
            # A GPU thread waiting for room (or about to) gets it, sees the cancel, goes on.
            credits.release(room)

    def _generate(
        self,
        text: str,
        language: str,
        speaker: int,
        stream: Callable[[FloatAudio | _Last | None], None] | None,
        synthesis: _Synthesis | None = None,
    ) -> FloatAudio:
        """Run on the GPU thread: text -> audio, streamed through `stream` when given."""
        model = self._model
        decoder = FrameDecoder(self._decode, self.chunk_frames)
        frames: list[np.ndarray] = []

        def on_frame(frame: np.ndarray) -> None:
            if stream is None:
                frames.append(frame)
            elif (chunk := decoder.push(frame)) is not None:
                stream(chunk)

        running = synthesis or _Synthesis(on_frame, 0)
        running.on_frame = on_frame
        running.codebook_size = int(model.codebook_size)
        _running.synthesis = running
        try:
            self._frames(text, language, speaker, running)
            if stream is not None and not running.cancelled.is_set():
                stream(_Last(decoder.flush()))
        finally:
            _running.synthesis = None
            if stream is not None:
                stream(None)  # also after an error: the reader waits for it, then sees the error
        if stream is not None or not frames:
            return np.zeros(0, dtype=np.float32)
        return self._decode(np.stack(frames, axis=1))

    def _frames(self, text: str, language: str, speaker: int, running: _Synthesis) -> None:
        """Run NeMo's frame loop over the text's chunks; frames reach `running.on_frame`."""
        model = self._model
        tokenizer = get_tokenizer_for_language(language, list(model.tokenizer.tokenizers))
        tokens, lengths, _ = chunk_text_for_inference(
            text=text,
            language=language,
            tokenizer_name=tokenizer,
            text_tokenizer=model.tokenizer,
            eos_token_id=model.eos_id,
        )
        state = model.create_chunk_state(batch_size=1)
        with torch.no_grad():
            for index, (chunk, length) in enumerate(zip(tokens, lengths, strict=True)):
                if running.cancelled.is_set():
                    break
                running.ended = False
                batch = {
                    "text": chunk.unsqueeze(0).to(model.device),
                    "text_lens": torch.tensor([length], device=model.device),
                    "speaker_indices": speaker,
                }
                model.generate_speech(
                    batch,
                    chunk_state=state,
                    end_of_text=[index == len(tokens) - 1],
                    beginning_of_text=index == 0,
                    use_cfg=True,
                    use_local_transformer_for_inference=True,
                )

    def _decode(self, frames: np.ndarray) -> FloatAudio:
        """Codes (codebooks x T) -> float32 audio at the codec's output rate."""
        model = self._model
        count = frames.shape[1]
        if count < MIN_DECODE_FRAMES:  # a very short segment: repeat its last frame, then trim
            pad = np.repeat(frames[:, -1:], MIN_DECODE_FRAMES - count, axis=1)
            frames = np.concatenate([frames, pad], axis=1)
        codes = torch.as_tensor(frames, dtype=torch.long, device=model.device).unsqueeze(0)
        lengths = torch.tensor([codes.shape[-1]], device=model.device)
        with torch.no_grad():
            audio, audio_lengths, _ = model._codec_helper.codes_to_audio(codes, lengths)
        samples: FloatAudio = audio[0, : int(audio_lengths[0])].float().cpu().numpy()
        samples = samples[: samples.size * count // frames.shape[1]]
        return np.clip(samples, -1.0, 1.0).astype(np.float32)
