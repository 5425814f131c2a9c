"""The `nemotron-speech` command line."""
