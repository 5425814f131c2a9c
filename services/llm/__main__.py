"""python -m services.llm: the same as `nemotron-speech serve llm`."""

import sys

from nemotron_speech.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "llm", *sys.argv[1:]]))
