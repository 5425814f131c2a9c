"""python -m services.llm: the same as `nemotron-speech serve llm`."""

import sys

from services.serve import main

if __name__ == "__main__":
    sys.exit(main("llm"))
