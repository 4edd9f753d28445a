#!/usr/bin/env bash
# Make a local stand-in for the Dockerfile's FROM image (no container registry is reachable from the test
# machines): Debian bookworm with Python 3.11 in a venv at /usr/local, as the official python image lays it out.
# Idempotent: does nothing when the image is already in local storage.
set -euo pipefail
image="docker.io/library/python:3.11-slim-bookworm"
work="${1:-var/container}"
if podman image exists "$image"; then
  echo "stand-in base image present: $image"
  exit 0
fi
# The machine's own Debian mirror (the one apt uses), not a third-party repository listed beside it.
mirror=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | head -n1 | tr -d ' ' || true)
mirror="${mirror:-http://deb.debian.org/debian}"
rootfs="$work/rootfs"
rm -rf "$rootfs" && mkdir -p "$rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,netbase,tzdata bookworm "$rootfs" "$mirror"
chroot "$rootfs" python3 -m venv /usr/local
rm -rf "$rootfs"/var/cache/apt/archives/*.deb
container=$(buildah from scratch)
buildah copy "$container" "$rootfs" / >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
  --cmd '["python3"]' "$container"
buildah commit --format docker "$container" "$image" >/dev/null
buildah rm "$container" >/dev/null
rm -rf "$rootfs"
echo "stand-in base image made: $image"
