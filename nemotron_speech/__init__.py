"""nemotron_speech."""
