#!/usr/bin/env bash
# CI's container check: the images built and the stack run in containers, one real turn through
# them. Needs root on a Debian bookworm host (CI's kind) and .venv (tools/tasks.sh setup) for the
# client side. Steps, each timed:
#   1. a Docker engine with Compose v2 and buildx (tools/docker-engine.sh);
#   2. the Python base image from Debian's packages, reused when it exists (tools/docker-base.sh);
#   3. `docker compose build`: the CPU image, FROM that base (PYTHON_IMAGE);
#   4. `docker compose up --detach --wait`: asr, tts, llm, bot, and in Jaeger's place an OTLP
#      receiver of ours (deploy/compose.ci.yaml: Jaeger's image cannot be pulled here);
#   5. one turn with `nemotron-speech talk` from the test set: WER, reply audio, and the spans
#      in the receiver's file (tools/container_turn.py);
# and always tears the stack down, leaving its logs in artifacts/containers.log.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step_started=$SECONDS
step() {
  printf 'ci-containers: %-34s %5d s\n' "$1" "$((SECONDS - step_started))"
  step_started=$SECONDS
}

tools/docker-engine.sh
step "engine, compose, buildx ready"
# Plain `docker compose up` selects the CPU stack (./.env); --profile gpu the GPU one instead.
services_of() { env -u COMPOSE_PROFILES docker compose "$@" config --services | sort | xargs; }
check_profiles() {
  local want=$1; shift
  local got; got=$(services_of "$@")
  echo "ci-containers: docker compose $* up -> $got"
  [ "$got" = "$want" ] || { echo "ci-containers: expected $want" >&2; exit 1; }
}
check_profiles "asr bot jaeger llm tts"
check_profiles "bot-gpu jaeger speech-gpu" --profile gpu
check_profiles "bot-gpu jaeger speech-gpu vllm" --profile gpu --profile vllm
PYTHON_IMAGE=$(tools/docker-base.sh)
export PYTHON_IMAGE
step "base image $PYTHON_IMAGE"

work=$(mktemp -d /tmp/nemotron-ci-containers.XXXXXX)
mkdir -p "$work/traces" artifacts
chmod 0777 "$work/traces"  # the receiver runs as the image's user
export NEMOTRON_CI_TRACES="$work/traces" NEMOTRON_CI_SINK="$PWD/tools/otlp_sink.py"
export BUILDKIT_PROGRESS=plain
compose=(docker compose -f compose.yaml -f deploy/compose.ci.yaml)
teardown() {
  code=$?
  "${compose[@]}" ps --all >&2 || true
  "${compose[@]}" logs --no-color --timestamps >artifacts/containers.log 2>&1 || true
  "${compose[@]}" down --remove-orphans --timeout 20 >&2 || true
  rm -rf "$work"
  echo "ci-containers: $([ "$code" = 0 ] && echo passed || echo "FAILED ($code)")" \
    "in $((SECONDS - started)) s; container logs in artifacts/containers.log" >&2
}
trap teardown EXIT

"${compose[@]}" build
# Each rebuild leaves the previous image untagged (1.5 GB apiece) and its layers in the build
# cache: drop the untagged images and keep the cache (uv's downloads and builds among it) to 10 GB.
docker image prune --force >/dev/null
docker builder prune --force --keep-storage 10GB >/dev/null
step "docker compose build"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E '^nemotron-(speech|python)' | sed 's/^/ci-containers: image /'

# Every service healthy (each checks the stages it serves), or fail after the deadline.
"${compose[@]}" up --detach --wait --wait-timeout "${STACK_WAIT_S:-420}"
step "docker compose up --wait (healthy)"
"${compose[@]}" ps --format 'table {{.Service}}\t{{.Status}}'
for service in $("${compose[@]}" ps --services); do
  id=$("${compose[@]}" ps --quiet "$service")
  health=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}}' "$id")
  echo "ci-containers: $service $health"
  [ "$health" = healthy ] || { echo "ci-containers: $service is $health" >&2; exit 1; }
done

# The client side from .venv, against the published ports (the compose defaults).
PYTHONPATH=$PWD timeout 420 .venv/bin/python tools/container_turn.py --work "$work" \
  --traces "$work/traces/spans.jsonl"
step "one turn through the containers"
.venv/bin/nemotron-speech trace-report --file "$work/traces/spans.jsonl" || true
