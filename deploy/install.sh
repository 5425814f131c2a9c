#!/usr/bin/env bash
# Installs the project from uv.lock into ./.venv: the one install path for the CPU image
# (deploy/Dockerfile.cpu) and for developers and CI (tools/tasks.sh setup -> install.sh --dev).
#   install.sh            runtime only, non-editable (images)
#   install.sh --dev      with the dev group, editable, keeping extras installed beside it (CI)
#   install.sh --extra X  also the extra X (e.g. nemo in the GPU image)
#   install.sh --no-install-project  the locked dependencies only (the images' cached layer)
#   install.sh --cuda     llama.cpp built with CUDA (the GPU image); CUDA_ARCHITECTURES overrides
#                         the GPU generations it is compiled for. Without an nvcc (CUDACXX or
#                         PATH), the CUDA compiler, headers and libraries come from PyPI's nvidia-*
#                         wheels at the CUDA release of the locked torch, into CUDA_TOOLKIT_DIR.
# llama-cpp-python compiles llama.cpp from source: about 6 minutes on 2 cores the first time;
# uv caches the built wheel afterwards. The build is portable, not tuned to the build host: the
# flags live in pyproject.toml ([tool.uv.config-settings-package]), which is part of uv's cache
# key, so a wheel built another way is never reused. README "Portable builds" has the details.
set -euo pipefail
cd "$(dirname "$0")/.."
uv() { if command -v uv >/dev/null 2>&1; then command uv "$@"; else python3 -m uv "$@"; fi; }

args=(--frozen)
dev=0
cuda=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --cuda)
      cuda=1
      # All of the package's settings, given here in full whether uv merges them with
      # pyproject's or replaces them: the CUDA wheel gets its own cache key, so a CPU-only
      # wheel is never reused for it.
      for define in GGML_NATIVE=OFF LLAVA_BUILD=OFF GGML_CUDA=on \
        "CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-80;86;89;90;100;120}"; do
        args+=(--config-settings-package "llama-cpp-python:cmake.define.$define")
      done
      ;;
    --extra) args+=(--extra "$2"); shift ;;
    --no-install-project) args+=(--no-install-project) ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
# A CUDA toolkit from wheels: the nvidia-* packages of CUDA 13 share one tree (nvidia/cu13: bin,
# nvvm, include, lib) that CMake takes as a toolkit. The compiler's release is the one of the
# CUDA runtime that uv.lock gives torch, so llama.cpp and torch load the same libcudart.
if [ "$cuda" = 1 ] && [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
  toolkit=${CUDA_TOOLKIT_DIR:-$PWD/.cache/cuda-toolkit}
  locked=$(uv export --frozen --extra nemo --no-hashes --no-header --no-emit-project)
  runtime=$(sed -n 's/^nvidia-cuda-runtime==\([0-9.]*\).*/\1/p' <<<"$locked" | head -1)
  cublas=$(sed -n 's/^nvidia-cublas==\([0-9.]*\).*/\1/p' <<<"$locked" | head -1)
  if [ -z "$runtime" ] || [ -z "$cublas" ]; then
    echo "install.sh --cuda: no nvidia-cuda-runtime/nvidia-cublas in uv.lock's nemo extra" >&2
    exit 1
  fi
  series=$(cut -d. -f1,2 <<<"$runtime")
  uv pip install --quiet --target "$toolkit" "nvidia-cuda-runtime==$runtime" \
    "nvidia-cublas==$cublas" "nvidia-cuda-nvcc==$series.*" "nvidia-cuda-crt==$series.*" \
    "nvidia-nvvm==$series.*" "nvidia-cuda-cccl==$series.*"
  root="$toolkit/nvidia/cu${series%%.*}"
  # The wheels ship only versioned libraries; CMake links against the unversioned names.
  for lib in "$root"/lib/lib*.so.*; do
    base=${lib%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
  # nvcc (its nvcc.profile) links from lib64, the wheels put everything in lib.
  [ -e "$root/lib64" ] || ln -s lib "$root/lib64"
  export CUDAToolkit_ROOT="$root" CUDACXX="$root/bin/nvcc" PATH="$root/bin:$PATH"
  # Without the driver's libcuda at build time: no virtual memory management pool, which is the
  # one part of ggml-cuda that links libcuda directly (the legacy pool is used instead).
  args+=(--config-settings-package "llama-cpp-python:cmake.define.GGML_CUDA_NO_VMM=ON")
  echo "install.sh: CUDA $series toolkit from PyPI wheels in $root" >&2
fi
if [ "$dev" = 1 ]; then
  # --inexact keeps what setup-nemo installed beside the lock (a CPU build of torch).
  uv sync "${args[@]}" --inexact
else
  uv sync "${args[@]}" --no-dev --no-editable
fi
