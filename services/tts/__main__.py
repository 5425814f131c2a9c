"""python -m services.tts: the same as `nemotron-speech serve tts`."""

import sys

from nemotron_speech.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "tts", *sys.argv[1:]]))
