"""services/asr."""
