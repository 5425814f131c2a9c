#!/usr/bin/env bash
# One entry point for the project's tasks. Usage: tools/tasks.sh TASK [pytest args...]
#   setup           create .venv with every dependency from uv.lock (uv caches builds)
#   setup-nemo      setup, plus the nemo extra at the lock's versions, with a CPU build of torch
#   generate        rewrite gen/ from protos/ with buf (local plugins only)
#   check-generate  fail if gen/ differs from what `buf generate` writes
#   compose-schema  fetch the Compose JSON schema that the deploy tests validate against
#   lint            buf lint, ruff check, ruff format --check, hadolint
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
    deploy/install.sh --dev --extra bench
    "$0" compose-schema
    ;;
  compose-schema)
    # The Compose specification's JSON schema, as published on PyPI inside docker-compose 1.29.2
    # (data only: the package is not installed). tests/test_deploy.py validates against it.
    schema=.cache/compose-spec/compose_spec.json
    if [ ! -s "$schema" ]; then
      mkdir -p "$(dirname "$schema")"
      wheels=$(mktemp -d)
      python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        --dest "$wheels" docker-compose==1.29.2
      python3 -m zipfile -e "$wheels"/docker_compose-1.29.2-py2.py3-none-any.whl "$wheels/x"
      cp "$wheels/x/compose/config/compose_spec.json" "$schema"
      rm -rf "$wheels"
    fi
    ;;
  setup-nemo)
    "$0" setup
    # The nemo extra at the versions in uv.lock, except torch: PyPI serves a CUDA build of several
    # GB that is useless without a GPU. The CPU build comes from local wheels where these machines
    # keep one (PIP_FIND_LINKS), else from the PyTorch CPU index.
    requirements=$(mktemp)
    trap 'rm -f "$requirements"' EXIT
    uv export --frozen --extra nemo --extra bench --no-hashes --no-emit-project --no-header \
      | grep -v -E '^(torch==|triton==|nvidia-|cuda-)' > "$requirements"
    uv pip install --no-deps -r "$requirements"
    torch_version=$(uv export --frozen --extra nemo --no-hashes | sed -n 's/^torch==\([0-9.]*\).*/\1/p')
    if [ -n "${PIP_FIND_LINKS:-}" ]; then
      uv pip install --no-deps --find-links "$PIP_FIND_LINKS" "torch==${torch_version}+cpu"
    else
      uv pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==${torch_version}"
    fi
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
    run hadolint deploy/Dockerfile.cpu deploy/Dockerfile.gpu
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
