"""Run a real server process whose backend is a test double (for signal and CLI tests).

python -m tests.serve_double asr|tts|llm [--port N] [--shutdown-grace-s S]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.runtime.logs import configure_logging
from services.runtime.server import MeshServer
from services.runtime.service import MeshService
from services.runtime.settings import add_settings_flags, settings_from_flags
from services.serve import SERVICES
from tests.doubles import (
    REPLY,
    CountingAsrBackendDouble,
    ScriptedLlmBackendDouble,
    ToneTtsBackendDouble,
)

DOUBLES = {
    "asr": CountingAsrBackendDouble,
    "tts": lambda: ToneTtsBackendDouble(word_delay_s=0.05),
    "llm": lambda: ScriptedLlmBackendDouble(REPLY, token_delay_s=0.05),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("service", choices=sorted(DOUBLES))
    known, rest = parser.parse_known_args()
    kind = SERVICES[known.service]
    flags = argparse.ArgumentParser()
    add_settings_flags(flags, kind.settings)
    settings = settings_from_flags(kind.settings, flags.parse_args(rest))
    configure_logging(settings.log_level, settings.log_format)
    service: MeshService = kind.service(settings, DOUBLES[known.service]())
    asyncio.run(MeshServer(service).run_until_signal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
