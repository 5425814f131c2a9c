"""Whisper decodes over an encoder window sized to the utterance, not Whisper's fixed 30 s.

faster-whisper pads every input to 30 s of mel frames, so the encoder costs the same for a 2 s
question as for 30 s of speech: about 0.6 s of a 2-core CPU with tiny.en, most of a finalize's
latency. The encoder accepts fewer frames (its positions are a prefix of the 30 s ones), and a
window that leaves several seconds of padding after the speech decodes short utterances to the same
text with the encoder at a tenth of its cost. Too tight a window makes Whisper loop ("What is ...
What is ..."), so the window always holds at least `MIN_PADDING_S` of silence after the audio and
never less than `MIN_WINDOW_S`; utterances that need the full window get Whisper's own path.

The no-speech and log-probability rules are the ones faster-whisper applies to a segment.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.runtime.audio import FloatAudio

#: Whisper's full window: 30 s of 10 ms mel frames.
FULL_WINDOW_FRAMES = 3000
#: The shortest encoder window, and the silence it always leaves after the audio.
MIN_WINDOW_S = 10.0
MIN_PADDING_S = 5.0
#: Windows come in steps of this many seconds, so that a growing utterance reuses few shapes.
WINDOW_STEP_S = 2.5
_FRAMES_PER_S = 100
#: Generation stops after this many tokens per second of audio (speech is well under 5).
_MAX_TOKENS_PER_S = 8
_MIN_NEW_TOKENS = 16


def window_frames(audio_frames: int) -> int:
    """Mel frames of the encoder window for `audio_frames` frames of audio (3000 = full)."""
    needed = audio_frames + MIN_PADDING_S * _FRAMES_PER_S
    step = WINDOW_STEP_S * _FRAMES_PER_S
    frames = max(MIN_WINDOW_S * _FRAMES_PER_S, np.ceil(needed / step) * step)
    return int(min(frames, FULL_WINDOW_FRAMES))


class WindowedDecoder:
    """Greedy or beam decoding of one utterance over a right-sized window (see module doc)."""

    def __init__(
        self,
        model: Any,
        beam_size: int,
        no_speech_threshold: float,
        log_prob_threshold: float,
    ) -> None:
        from ctranslate2 import StorageView  # type: ignore[import-untyped]
        from faster_whisper.tokenizer import Tokenizer  # type: ignore[import-untyped]

        self._model = model  # a faster_whisper.WhisperModel
        self._storage_view = StorageView
        self._tokenizer_class = Tokenizer
        self.beam_size = beam_size
        self.no_speech_threshold = no_speech_threshold
        self.log_prob_threshold = log_prob_threshold
        self._prompts: dict[str, tuple[Any, list[int], list[int]]] = {}

    def _prompt(self, language: str) -> tuple[Any, list[int], list[int]]:
        """The tokenizer, prompt and suppressed tokens of `language`, built once per language."""
        if language not in self._prompts:
            model = self._model
            tokenizer = self._tokenizer_class(
                model.hf_tokenizer,
                model.model.is_multilingual,
                task="transcribe",
                language=language if model.model.is_multilingual else "en",
            )
            prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
            self._prompts[language] = (tokenizer, prompt, _suppressed(tokenizer))
        return self._prompts[language]

    def fits(self, audio: FloatAudio) -> bool:
        """Whether `audio` decodes in a window shorter than Whisper's own."""
        frames = audio.size // (self._model.feature_extractor.sampling_rate // _FRAMES_PER_S)
        return window_frames(frames) < FULL_WINDOW_FRAMES

    def decode(self, audio: FloatAudio, language: str) -> str:
        """Blocking: the text of `audio` (which must fit), or "" when it is not speech."""
        model = self._model
        features = model.feature_extractor(audio)  # (mels, frames)
        frames = window_frames(features.shape[-1])
        window = np.zeros((1, features.shape[0], frames), dtype=np.float32)
        window[0, :, : features.shape[-1]] = features[:, :frames]
        encoded = model.model.encode(self._storage_view.from_array(window), to_cpu=False)
        tokenizer, prompt, suppressed = self._prompt(language)
        seconds = audio.size / model.feature_extractor.sampling_rate
        new_tokens = max(_MIN_NEW_TOKENS, int(_MAX_TOKENS_PER_S * seconds))
        (result,) = model.model.generate(
            encoded,
            [prompt],
            beam_size=self.beam_size,
            max_length=min(len(prompt) + new_tokens, model.max_length),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=suppressed,
        )
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        # faster-whisper's segment rule: silence if the model says so and is not confident.
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if (
            result.no_speech_prob > self.no_speech_threshold
            and avg_logprob < self.log_prob_threshold
        ):
            return ""
        text = str(tokenizer.decode(tokens)).strip()
        # A lone "." or "..." is Whisper's answer to a window of near silence, never speech.
        return text if any(c.isalnum() for c in text) else ""


def _suppressed(tokenizer: Any) -> list[int]:
    """Whisper's default suppression: non-speech symbols and the task tokens."""
    tokens = set(tokenizer.non_speech_tokens)
    tokens.update(
        (
            tokenizer.transcribe,
            tokenizer.translate,
            tokenizer.sot,
            tokenizer.sot_prev,
            tokenizer.sot_lm,
            tokenizer.no_speech,
        )
    )
    return sorted(tokens)
