#!/usr/bin/env bash
# Makes a local Debian bookworm base image from Debian's archive, for building the Dockerfile where no
# image registry is reachable (offline hosts, CI machines without Docker Hub):
#
#   scripts/docker-base.sh [TAG]        # default TAG: stpm-base:bookworm
#   docker build --build-arg BASE_IMAGE=stpm-base:bookworm --target cpu ...
#
# debootstrap (minbase) + python3, python3-venv, ca-certificates, tini: the packages the Dockerfile's
# stages would otherwise install with apt, so a build on this base needs no apt at all. Python 3.11.
# Does nothing when TAG exists already. Needs root, debootstrap and a running Docker daemon.
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), DOCKER (the docker client).
set -euo pipefail
TAG="${1:-stpm-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKER="${DOCKER:-docker}"
if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
work="$(mktemp -d /var/tmp/stpm-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
echo "debootstrap bookworm from $MIRROR into $root"
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
        bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
fi
# The same suites a Debian image has, so images built on this base can apt-get security fixes.
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
# Downloaded packages, package lists, docs and logs are not needed in an image.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/tmp/*
tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm + python3 python3-venv ca-certificates tini" \
    - "$TAG" >/dev/null
echo "made base image $TAG ($("$DOCKER" image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
