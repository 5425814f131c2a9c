#!/usr/bin/env bash
# Builds the GPU image (deploy/Dockerfile.gpu, target runtime) without any registry image, as CI
# does when asked (not on every run: it is several GB and, with llama.cpp's CUDA kernels compiled
# for six GPU generations, long on few cores), then checks it without a GPU: the imports of the
# GPU engines and `nemotron-speech serve asr --backend nemo --help` inside it, and its size.
#   tools/build-gpu-image.sh                      all of deploy/install.sh's GPU generations
#   CUDA_ARCHITECTURES=90 tools/build-gpu-image.sh  one generation (Hopper), a faster build
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
tools/docker-engine.sh >/dev/null
PYTHON_IMAGE=$(tools/docker-base.sh)
tag=${GPU_IMAGE:-nemotron-speech-gpu:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
args=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
if [ -n "${CUDA_ARCHITECTURES:-}" ]; then
  args+=(--build-arg "CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES")
fi
DOCKER_BUILDKIT=1 BUILDKIT_PROGRESS=plain docker build -f deploy/Dockerfile.gpu --target runtime \
  "${args[@]}" -t "$tag" .
echo "build-gpu-image: $tag built in $((SECONDS - started)) s"
docker run --rm --entrypoint python "$tag" -c '
import importlib.metadata as m
import torch, llama_cpp, nemo.collections.asr, nemo.collections.tts
import services.asr.backends.parakeet, services.tts.backends.magpie, services.llm.backends.llama_cpp
print("torch", torch.__version__, "CUDA", torch.version.cuda)
print("nemo", m.version("nemo-toolkit"), "llama-cpp-python", m.version("llama-cpp-python"))
'
# llama.cpp reports GPU offload only where a driver answers; here, check that its CUDA backend
# was built and finds the CUDA runtime and cuBLAS of the torch wheels (the driver comes from the
# host at run time, with the NVIDIA container toolkit).
docker run --rm --entrypoint sh "$tag" -c '
cuda=$(python -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / \"lib\" / \"libggml-cuda.so\")")
test -f "$cuda" || { echo "build-gpu-image: llama.cpp has no CUDA backend ($cuda)" >&2; exit 1; }
if ldd "$cuda" | grep "not found"; then echo "build-gpu-image: unresolved libraries" >&2; exit 1; fi
ldd "$cuda" | grep -E "libcudart|libcublas" | sed "s/^/build-gpu-image: llama.cpp CUDA backend links /"
'
docker run --rm "$tag" nemotron-speech serve asr --backend nemo --help >/dev/null
echo "build-gpu-image: serve asr --backend nemo --help ok"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$tag" | sed 's/^/build-gpu-image: image /'
