"""Whisper decodes over an encoder window sized to the utterance, not Whisper's fixed 30 s.

faster-whisper pads every input to 30 s of mel frames, so the encoder costs the same for a 2 s
question as for 30 s of speech: about 0.6 s of a 2-core CPU with tiny.en, most of a finalize's
latency. The encoder accepts fewer frames (its positions are a prefix of the 30 s ones), and a
window that leaves several seconds of padding after the speech decodes short utterances to the same
text with the encoder at a tenth of its cost. Too tight a window makes Whisper loop ("What is ...
What is ..."), so the window always holds at least `MIN_PADDING_S` of silence after the audio and
never less than `MIN_WINDOW_S`; utterances that need the full window get Whisper's own path.

The no-speech and log-probability rules are the ones faster-whisper applies to a segment. Word
times, when asked for, come from faster-whisper's own alignment (cross-attention heads, dynamic
time warping, 20 ms steps) over the same encoder output; its pieces are joined into the words of
the text as written (split at spaces), so that the words joined by spaces are the text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from services.asr.backend import RecognizedWord
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
#: faster-whisper's bounds for words after silence: twice the median word, the median at most
#: 0.7 s; its sentence ends, after which a pause is likely.
_MAX_MEDIAN_WORD_MS = 700.0
_SENTENCE_ENDS = frozenset(".!?\u3002\uff01\uff1f")


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
        return self.decode_words(audio, language, with_words=False)[0]

    def decode_words(
        self, audio: FloatAudio, language: str, with_words: bool = True
    ) -> tuple[str, list[RecognizedWord]]:
        """Blocking: the text of `audio` (which must fit) and, `with_words`, its timed words."""
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
            return "", []
        text = str(tokenizer.decode(tokens)).strip()
        # A lone "." or "..." is Whisper's answer to a window of near silence, never speech.
        if not any(c.isalnum() for c in text):
            return "", []
        if not with_words:
            return text, []
        return text, aligned_words(model, tokenizer, tokens, encoded, features.shape[-1])


def aligned_words(
    model: Any, tokenizer: Any, tokens: list[int], encoded: Any, frames: int
) -> list[RecognizedWord]:
    """The words of `tokens` with faster-whisper's times and probabilities (`frames`: audio)."""
    (alignment,) = model.find_alignment(tokenizer, [tokens], encoded, frames)
    return spaced_words(
        (str(a["word"]), float(a["start"]), float(a["end"]), float(a["probability"]))
        for a in alignment
    )


def spaced_words(pieces: Iterable[tuple[str, float, float, float]]) -> list[RecognizedWord]:
    """Whisper's aligned pieces (text, start s, end s, probability) as whitespace-split words.

    A piece that begins with a space starts a word; one that does not ("-", ".", "n't") belongs
    to the word before. A word spans its pieces and its confidence is their mean probability.
    The alignment stretches a word after silence back to the silence's start (the first word of
    an utterance often "starts" at 0); as faster-whisper does, such a word is cut to twice the
    median word length.
    """
    words: list[RecognizedWord] = []
    probabilities: list[float] = []
    for text, start, end, probability in pieces:
        if not text.strip():
            continue
        if words and not text[0].isspace():
            last = words[-1]
            probabilities.append(probability)
            words[-1] = RecognizedWord(
                last.text + text.strip(),
                last.start_ms,
                max(last.end_ms, 1000.0 * end),
                sum(probabilities) / len(probabilities),
            )
            continue
        probabilities = [probability]
        words.append(RecognizedWord(text.strip(), 1000.0 * start, 1000.0 * end, probability))
    return _trim_after_silence(words)


def _trim_after_silence(words: list[RecognizedWord]) -> list[RecognizedWord]:
    lengths = [w.end_ms - w.start_ms for w in words if w.end_ms > w.start_ms]
    if not lengths:
        return words
    longest = 2 * min(_MAX_MEDIAN_WORD_MS, float(np.median(lengths)))
    trimmed = list(words)
    for index, word in enumerate(words):
        after_silence = index == 0 or words[index - 1].text[-1] in _SENTENCE_ENDS
        if after_silence and word.end_ms - word.start_ms > longest:
            trimmed[index] = RecognizedWord(
                word.text, word.end_ms - longest, word.end_ms, word.confidence
            )
    return trimmed


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
