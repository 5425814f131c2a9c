#!/usr/bin/env bash
# Installs the project from uv.lock into ./.venv: the one install path for the CPU image
# (deploy/Dockerfile.cpu) and for developers and CI (tools/tasks.sh setup -> install.sh --dev).
#   install.sh            runtime only, non-editable (images)
#   install.sh --dev      with the dev group, editable, keeping extras installed beside it (CI)
#   install.sh --extra X  also the extra X (e.g. nemo in the GPU image)
#   install.sh --cuda     llama.cpp built with CUDA (the GPU image); CUDA_ARCHITECTURES overrides
#                         the GPU generations it is compiled for
# llama-cpp-python compiles llama.cpp from source: about 6 minutes on 2 cores the first time;
# uv caches the built wheel afterwards. The build is portable, not tuned to the build host: the
# flags live in pyproject.toml ([tool.uv.config-settings-package]), which is part of uv's cache
# key, so a wheel built another way is never reused. README "Portable builds" has the details.
set -euo pipefail
cd "$(dirname "$0")/.."
uv() { if command -v uv >/dev/null 2>&1; then command uv "$@"; else python3 -m uv "$@"; fi; }

args=(--frozen)
dev=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --cuda)
      # All of the package's settings, given here in full whether uv merges them with
      # pyproject's or replaces them: the CUDA wheel gets its own cache key, so a CPU-only
      # wheel is never reused for it.
      for define in GGML_NATIVE=OFF LLAVA_BUILD=OFF GGML_CUDA=on \
        "CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-80;86;89;90;100;120}"; do
        args+=(--config-settings-package "llama-cpp-python:cmake.define.$define")
      done
      ;;
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
