"""services/tts."""
