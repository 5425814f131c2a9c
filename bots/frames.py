"""The frames our adapters add to Pipecat's; every module imports them from here.

The LLM adapter tags each chunk with its request and index, the TTS adapter speaks it as one
segment with an id built from both, and reports the segment's completion back upstream, so that
the LLM adapter releases the next chunk for exactly the chunk that was spoken (ids, not counts).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipecat.frames.frames import LLMTextFrame, SystemFrame


def segment_id_of(request_id: str, chunk_index: int) -> str:
    """The TTS segment id that speaks chunk `chunk_index` of LLM request `request_id`."""
    return f"{request_id}/{chunk_index}"


@dataclass
class LLMChunkFrame(LLMTextFrame):
    """One sentence-sized chunk of a GenerateChunks reply.

    An `LLMTextFrame`, so any Pipecat TTS can speak it; ours speaks it as one segment.

    Parameters:
        request_id: The GenerateChunks request that produced it.
        chunk_index: Its index within that request.
        ends_sentence: Whether the chunk ends a sentence (a pause may follow it).
    """

    request_id: str = ""
    chunk_index: int = 0
    ends_sentence: bool = False

    @property
    def segment_id(self) -> str:
        """The id of the TTS segment that speaks this chunk."""
        return segment_id_of(self.request_id, self.chunk_index)


@dataclass
class SegmentCompleteFrame(SystemFrame):
    """Pushed upstream by the TTS adapter when a segment's last audio has been produced.

    Parameters:
        segment_id: The segment, as sent in `TextSegment.segment_id`.
        audio_ms: Audio length of the segment.
    """

    segment_id: str = ""
    audio_ms: float = 0.0
