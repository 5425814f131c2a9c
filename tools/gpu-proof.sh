#!/usr/bin/env bash
# The GPU proof (issue 19): random-weight runs of the real speech architectures on a GPU machine.
#
#   tools/gpu-proof.sh prepare   here (with network to PyPI): the wheels the GPU machine lacks,
#                                into build/gpu-wheels (ignored by git), with their total size
#   tools/gpu-proof.sh run       on the GPU machine (no network): install those wheels into
#                                /tmp/site, then `python -m loadtest gpu`, figures under $OUT
#
# The GPU machine has Python 3.12 with PyTorch 2.11 (CUDA 13) and no NeMo, and reaches nothing;
# what travels (the tree plus build/gpu-wheels) must stay under 64 MiB. NeMo's full dependency
# set does not fit (pynini alone is 148 MiB), so the list below is what the benchmark actually
# imports that the machine does not have: found by running `python -m loadtest gpu --small`
# here with every other missing package made unimportable. Left out, unused by the benchmark:
# pynini, nemo_text_processing, cdifflib, sacremoses, trio and grpcio-tools. Carried although
# the machine has a version: lightning (NeMo's resolution pins 2.4; with 2.6, nv-one-logger's
# trainer fails at import: "weights_only must be a supertype of Optional[bool]"), protobuf (our
# generated code needs a runtime >= its 6.33 gencode) and grpcio (to match grpcio-status). Versions are this project's venv's, so the
# GPU runs what the CPU test ran.
#
# A device session runs, with build/gpu-wheels carried:
#   bash tools/gpu-proof.sh run          (timeout_s 600; the benchmark stops starting new work
#                                         after GPU_PROOF_BUDGET_S, default 330 s)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/build/gpu-wheels"
LIMIT_MIB=64

# Distributions the benchmark imports that the GPU machine's image lacks (KINDS.md's list).
PACKAGES=(
  nemo-toolkit lightning omegaconf hydra-core antlr4-python3-runtime lhotse cytoolz datasets dill
  multiprocess librosa pooch decorator soundfile cffi pycparser soxr editdistance kaldialign
  intervaltree braceexpand webdataset num2words wandb platformdirs toml StrEnum PySocks
  truststore overrides sniffio python-dotenv httpx2 httpcore2
  nv-one-logger-core nv-one-logger-pytorch-lightning-integration nv-one-logger-training-telemetry
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection
  googleapis-common-protos grpcio grpcio-status grpcio-health-checking grpcio-reflection protobuf
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  opentelemetry-instrumentation opentelemetry-instrumentation-grpc
  opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc
  opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-common
  opentelemetry-exporter-http-transport opentelemetry-exporter-prometheus
)

PLATFORMS=()
for tag in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${tag}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# A Python with pip (the project's venv, made by uv, has none): $PIP_PYTHON or one on the PATH.
pip_python() {
  local py
  for py in ${PIP_PYTHON:-} $(type -ap python3 python3.12 python3.11); do
    if "$py" -m pip --version >/dev/null 2>&1; then echo "$py"; return; fi
  done
  echo "no python3 with pip found (set PIP_PYTHON)" >&2
  return 1
}

prepare() {
  local venv="$ROOT/.venv/bin/python" py
  [[ -x "$venv" ]] || { echo "no $venv: run 'uv sync --extra nemo' first" >&2; exit 1; }
  py="$(pip_python)"
  local pip=("$py" -m pip)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  local pins
  pins="$("$venv" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import version
print("\n".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)"
  while read -r pin; do
    if ! "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$WHEELS" "$pin" >/dev/null 2>&1; then
      # No wheel on the index (antlr4-python3-runtime 4.9.3 is an sdist): build one, which must
      # be pure Python to run on the GPU machine's 3.12.
      "${pip[@]}" wheel -q --no-deps -w "$WHEELS" "$pin" >/dev/null 2>&1 \
        || { echo "neither a wheel nor an sdist for $pin" >&2; exit 1; }
    fi
  done <<<"$pins"
  if ls "$WHEELS" | grep -v -e '-py3-none-any\.whl$' -e '-py2\.py3-none-any\.whl$' \
      -e 'cp312' -e 'abi3' -e 'py3-none-manylinux' -e 'py2\.py3-none-manylinux' -e 'py312-none' \
      | grep .; then
    echo "the wheels above would not run on CPython 3.12 x86-64" >&2; exit 1
  fi
  local wheels tree total
  wheels=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
  tree=$(cd "$ROOT" && { git ls-files -z; git ls-files -z -o --exclude-standard; } \
    | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
  total=$((wheels + tree))
  awk -v n="$(ls "$WHEELS" | wc -l)" -v w="$wheels" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN {
    m = 1048576
    printf "%d wheels: %.1f MiB; the tree: %.1f MiB; together %.1f MiB (limit %d MiB)\n",
      n, w / m, t / m, (w + t) / m, l
  }'
  if ((total > LIMIT_MIB * 1048576)); then
    echo "over the ${LIMIT_MIB} MiB the device machine takes" >&2; exit 1
  fi
}

run() {
  : "${OUT:?OUT (the folder whose files come back) must be set: this runs on the device machine}"
  cd "$ROOT"
  local budget="${GPU_PROOF_BUDGET_S:-330}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$ROOT:$ROOT/gen" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  # Fail fast, with the reason, if an import is missing: cheaper than a failed benchmark.
  python3 - <<'EOF' 2>&1 | tee "$OUT/preflight.txt"
import torch
import nemo.collections.asr.models, nemo.collections.tts.models  # noqa: F401
import services.asr.backends.parakeet, services.tts.backends.magpie  # noqa: F401
print("preflight ok: torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF
  # The hard stop leaves time for the reply; the JSON is saved after every point anyway.
  timeout -k 30 --signal=INT $((budget + 120)) python3 -m loadtest gpu --budget-s "$budget" \
    --out "$OUT/gpu_bench.json" --md "$OUT/gpu_bench.md" 2>&1 | tee "$OUT/gpu_bench.log"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
