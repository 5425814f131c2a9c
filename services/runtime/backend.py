"""The base of every model backend: what the runtime needs of an engine, whatever it serves.

Each capability's seam (`services/asr/backend.py`, `tts/backend.py`, `llm/backend.py`) derives
from `Backend` and adds only its own streaming method and data types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, Self, TypeVar

from services.runtime.settings import ServerSettings

SettingsT = TypeVar("SettingsT", bound=ServerSettings)


class Backend(ABC, Generic[SettingsT]):
    """A model engine built from its server's settings, loaded once, released at shutdown.

    Blocking work (loading weights, inference) must run off the event loop: the health service
    answers NOT_SERVING while `load` runs, and every stream shares the loop.
    """

    #: Registry name, e.g. "whisper", "piper", "llama_cpp".
    name: str = ""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """Name of the loaded model (never a full path), reported to clients."""

    @classmethod
    def from_settings(cls, settings: SettingsT) -> Self:
        """Build the backend from the server's settings; loading happens later, in `load`."""
        return cls()

    async def load(self) -> None:
        """Load and warm up the model (health reports NOT_SERVING until this returns)."""

    async def aclose(self) -> None:
        """Release the model."""
