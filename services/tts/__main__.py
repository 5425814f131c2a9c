"""python -m services.tts: the same as `nemotron-speech serve tts`."""

import sys

from services.serve import main

if __name__ == "__main__":
    sys.exit(main("tts"))
