#!/usr/bin/env bash
# Installs the project from uv.lock into ./.venv: the one install path for the CPU image
# (deploy/Dockerfile.cpu) and for developers and CI (tools/tasks.sh setup -> install.sh --dev).
#   install.sh            runtime only, non-editable (images)
#   install.sh --dev      with the dev group, editable, keeping extras installed beside it (CI)
#   install.sh --extra X  also the extra X (e.g. nemo in the GPU image)
# llama-cpp-python compiles llama.cpp from source: about 7 minutes on 2 cores the first time;
# uv caches the built wheel afterwards. Set CMAKE_ARGS="-DGGML_CUDA=on" for a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
uv() { if command -v uv >/dev/null 2>&1; then command uv "$@"; else python3 -m uv "$@"; fi; }

args=(--frozen)
dev=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --extra) args+=(--extra "$2"); shift ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$dev" = 1 ]; then
  # --inexact keeps what setup-nemo installed beside the lock (a CPU build of torch).
  uv sync "${args[@]}" --inexact
else
  uv sync "${args[@]}" --no-dev --no-editable
fi
