"""python -m nemotron_speech."""

import sys

from nemotron_speech.cli import main

sys.exit(main())
