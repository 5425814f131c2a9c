#!/usr/bin/env bash
# One entry point for the project's tasks. Usage: tools/tasks.sh TASK [pytest args...]
#   setup           create .venv with every dependency from uv.lock (uv caches builds)
#   generate        rewrite gen/ from protos/ with buf (local plugins only)
#   check-generate  fail if gen/ differs from what `buf generate` writes
#   lint            buf lint, ruff check, ruff format --check
#   breaking        buf breaking against the main branch
#   typecheck       mypy --strict on our code (gen/ excluded)
#   test            setup, then the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_LINK_MODE=copy

# uv from PATH, or the one pip installed into this Python (CI installs it with pip).
uv() { if command -v uv >/dev/null 2>&1; then command uv "$@"; else python3 -m uv "$@"; fi; }
run() { uv run --frozen --no-sync "$@"; }

task=${1:-}
shift || true
case "$task" in
  setup)
    uv sync --frozen
    ;;
  generate)
    run buf generate
    ;;
  check-generate)
    run pytest -q tests/test_codegen.py
    ;;
  lint)
    run buf lint
    run ruff check .
    run ruff format --check .
    ;;
  breaking)
    if git rev-parse --verify --quiet main >/dev/null; then
      run buf breaking --against '.git#branch=main'
    else
      echo "breaking: no local main branch to compare with; skipped"
    fi
    ;;
  typecheck)
    run mypy
    ;;
  test)
    "$0" setup
    run pytest "$@"
    ;;
  *)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
