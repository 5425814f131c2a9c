"""python -m services.asr: the same as `nemotron-speech serve asr`."""

import sys

from services.serve import main

if __name__ == "__main__":
    sys.exit(main("asr"))
