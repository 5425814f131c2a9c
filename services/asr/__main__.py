"""python -m services.asr: the same as `nemotron-speech serve asr`."""

import sys

from nemotron_speech.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "asr", *sys.argv[1:]]))
