#!/bin/sh
# Makes a local Debian bookworm base image with Python 3.11 for hosts that cannot
# pull images (no registry but Debian's is reachable): debootstrap, then import.
#   containers/debootstrap-base.sh [IMAGE]   (default localhost/kiln-base:bookworm)
# Then build with --build-arg BASE=IMAGE (see docs/deploy.md, "Containers").
# Needs root, debootstrap and podman; takes 3-5 minutes.
set -eu
image="${1:-localhost/kiln-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(mktemp -d "${TMPDIR:-/var/tmp}/kiln-base.XXXXXX")"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror"
# Python after the base system: debootstrap's --include configures it too early.
chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv ca-certificates'
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image"
echo "made $image"
