#!/usr/bin/env bash
# Makes the Python base image that deploy/Dockerfile.cpu and Dockerfile.gpu build FROM on a host
# that cannot pull from a container registry: Debian bookworm from Debian's own packages
# (debootstrap), with python3 (3.11), venv and pip, imported as nemotron-python-base:bookworm.
# Reused when that tag exists (FORCE=1 rebuilds). Prints the tag.
#
# The host's CA bundle goes into the image (/etc/ssl/host-ca-bundle.crt) and SSL_CERT_FILE,
# PIP_CERT and REQUESTS_CA_BUNDLE point at it, so that pip and uv inside builds trust what this
# host trusts (a proxy's CA included). With registry access, the Dockerfiles' default base
# (python:3.11-slim-bookworm) needs none of this.
#   tools/docker-base.sh                      -> nemotron-python-base:bookworm
#   BASE_IMAGE=tag MIRROR=url tools/docker-base.sh
set -euo pipefail
tag=${BASE_IMAGE:-nemotron-python-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2
fi
root=$(mktemp -d /tmp/nemotron-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
started=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$mirror" >&2
install -m 0644 "$ca_bundle" "$root/etc/ssl/host-ca-bundle.crt"
# What Debian's docker images drop: package caches and the apt lists (builds run apt-get update).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
tar -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/host-ca-bundle.crt' \
  --change 'ENV PIP_CERT=/etc/ssl/host-ca-bundle.crt' \
  --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/host-ca-bundle.crt' \
  --change 'CMD ["python3"]' \
  - "$tag" >&2
echo "docker-base: $tag made in $((SECONDS - started)) s" >&2
echo "$tag"
