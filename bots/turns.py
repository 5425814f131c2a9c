"""Who decides that the user's turn is over, and when the LLM may start.

The `UserTurnProcessor` before the STT adapter decides the turn end (SmartTurn, or the VAD
timeout) without waiting for transcripts, so the adapter learns of the turn end at once and can
finalize. The adapter then holds the `UserStoppedSpeakingFrame` until the final transcript is
out. In the context aggregator, `FinalTranscriptTurnStop` adopts that turn end as soon as both
the stop and the final transcript have reached it, in either order: Pipecat hands system frames
(the stop) ahead of data frames (the transcript), so their arrival order is not theirs to keep.
"""

from __future__ import annotations

from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.frames.frames import (
    Frame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start import ExternalUserTurnStartStrategy, VADUserTurnStartStrategy
from pipecat.turns.user_stop import (
    BaseUserTurnStopStrategy,
    SpeechTimeoutUserTurnStopStrategy,
    TurnAnalyzerUserTurnStopStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from bots.turn_settings import TurnSettings


class FinalTranscriptTurnStop(BaseUserTurnStopStrategy):
    """Ends the aggregator's user turn once the stop was announced and the final arrived."""

    def __init__(self) -> None:
        super().__init__()
        self._stopped = False
        self._final = False

    async def handle_user_turn_started(self) -> None:
        """A new turn: nothing announced, nothing final yet."""
        self._stopped = False
        self._final = False

    async def handle_user_turn_stopped(self) -> None:
        """The turn ended (here or by the stop timeout)."""
        await self.handle_user_turn_started()

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        """Track the announced stop and the finalized transcript; end the turn on both."""
        if isinstance(frame, UserStartedSpeakingFrame):
            self._stopped = False
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._stopped = True
        elif isinstance(frame, TranscriptionFrame) and frame.finalized:
            self._final = True
        else:
            return ProcessFrameResult.CONTINUE
        if self._stopped and self._final:
            self._stopped = self._final = False
            await self.trigger_user_turn_stopped(enable_user_speaking_frames=False)
            return ProcessFrameResult.STOP
        return ProcessFrameResult.CONTINUE


def turn_detection(turn: TurnSettings) -> UserTurnStrategies:
    """Strategies for the `UserTurnProcessor` in front of the STT adapter.

    SmartTurn v3 judges whether the user is done at each VAD pause (and `smart_turn_stop_s` of
    silence ends the turn whatever it says); without it, the VAD's own stop (`vad_stop_s`) ends
    the turn. Neither waits for transcripts: the STT adapter does. The VAD start interrupts the
    bot at once unless barge-in is gated; then `bots.barge_in.BargeInGate` decides.
    """
    stop: BaseUserTurnStopStrategy = (
        TurnAnalyzerUserTurnStopStrategy(
            turn_analyzer=LocalSmartTurnAnalyzerV3(
                params=SmartTurnParams(stop_secs=turn.smart_turn_stop_s)
            ),
            wait_for_transcript=False,
        )
        if turn.smart_turn
        else SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.0, wait_for_transcript=False)
    )
    start = VADUserTurnStartStrategy(enable_interruptions=not turn.barge_in_gated)
    return UserTurnStrategies(start=[start], stop=[stop])


def aggregator_turns() -> UserTurnStrategies:
    """Strategies for the context aggregator: adopt the turn decided upstream."""
    return UserTurnStrategies(
        start=[ExternalUserTurnStartStrategy(enable_interruptions=False)],
        stop=[FinalTranscriptTurnStop()],
    )
