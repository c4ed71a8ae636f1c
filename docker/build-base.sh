#!/usr/bin/env bash
# Build a Debian bookworm "slim" base image from Debian's packages, for machines that reach
# Debian's mirror but no image registry: debootstrap --variant=minbase into a folder, trim
# it the way the official bookworm-slim image is trimmed (no man pages, docs or locales;
# apt keeps no caches), then `docker import` it.  Usage: build-base.sh TAG
set -euo pipefail
TAG=${1:?usage: build-base.sh TAG}
SUITE=bookworm

say() { echo "build-base: $*"; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
    say "$TAG exists"
    exit 0
fi
command -v debootstrap >/dev/null || {
    say "installing debootstrap"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap </dev/null
}

# The mirror this machine's apt uses (it is reachable); deb.debian.org otherwise.
MIRROR=${DEBIAN_MIRROR:-$({ grep -shoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
    || true; } | awk '{print $2}' | head -n 1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${MIRROR%/debian}/debian-security

ROOTFS=$(mktemp -d /var/tmp/abx-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
say "debootstrap $SUITE from $MIRROR (a minute or two)"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"

# What the official debian:bookworm-slim sets up (docker-debian-artifacts' "slimify").
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
echo 'Acquire::Languages "none";' >"$ROOTFS/etc/apt/apt.conf.d/docker-no-languages"
echo 'APT::Install-Recommends "false";' >"$ROOTFS/etc/apt/apt.conf.d/docker-no-recommends"
cat >"$ROOTFS/etc/apt/sources.list" <<LIST
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
LIST
find "$ROOTFS/usr/share/doc" -mindepth 2 -not -name copyright -not -type d -delete 2>/dev/null || true
rm -rf "$ROOTFS"/usr/share/{man,info,groff,lintian,linda}/* "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/tmp/*
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
    -exec rm -rf {} + 2>/dev/null || true

say "importing as $TAG"
tar --numeric-owner -C "$ROOTFS" -c . \
    | docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
        --message "debootstrap --variant=minbase $SUITE ($MIRROR), slimmed" - "$TAG" >/dev/null
say "$TAG: $(docker image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
