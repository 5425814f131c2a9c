#!/usr/bin/env bash
# Makes a Docker engine with Compose v2 and buildx ready on a Debian bookworm host, as root (CI):
#   - the engine from Debian's docker.io package, started in the background when no daemon
#     answers (log: /var/log/nemotron-dockerd.log);
#   - Compose v2 and buildx from Debian trixie's docker-compose and docker-buildx packages
#     (bookworm's docker-compose is 1.29, which reads neither `include:` nor GPU reservations),
#     their binaries put in ~/.docker/cli-plugins. Only those two .debs are downloaded, through a
#     private apt state: the host's sources stay as they are.
# Idempotent: whatever is already there is reused.
set -euo pipefail
plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
log=${DOCKERD_LOG:-/var/log/nemotron-dockerd.log}
mirror=${MIRROR:-http://deb.debian.org/debian}

if ! command -v dockerd >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
fi
if ! docker info >/dev/null 2>&1; then
  nohup dockerd >"$log" 2>&1 &
  deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "docker-engine: dockerd did not answer within 60 s; see $log" >&2
      tail -20 "$log" >&2
      exit 1
    fi
    sleep 1
  done
fi

# docker-compose -> the `docker compose` plugin, docker-buildx -> `docker buildx` (and `docker
# build` with BuildKit on clients that delegate to it).
need=()
docker compose version >/dev/null 2>&1 || need+=(docker-compose)
docker buildx version >/dev/null 2>&1 || need+=(docker-buildx)
if [ ${#need[@]} -gt 0 ]; then
  work=$(mktemp -d /tmp/nemotron-trixie.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
  printf 'deb %s trixie main\n' "$mirror" >"$work/sources.list"
  apt_private=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=-"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
    -o "Debug::NoLocking=1" -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
  apt-get "${apt_private[@]}" update -q >&2
  (cd "$work/debs" && apt-get "${apt_private[@]}" download "${need[@]}" >&2)
  mkdir -p "$plugins"
  for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
  done
  for name in docker-compose docker-buildx; do
    found=$(find "$work/root" -type f -name "$name" -perm -u+x | head -1)
    if [ -n "$found" ]; then install -m 0755 "$found" "$plugins/$name"; fi
  done
fi
docker compose version
docker buildx version
