#!/usr/bin/env bash
# `make image`: build the AggBox image (default tag aggbox:latest) from this checkout.
#
# Base: debian:bookworm-slim if the engine has it or a registry serves it; otherwise the
# same base is built from Debian's packages (docker/build-base.sh: debootstrap + import).
# Fast when nothing changed: the image carries a digest of aggbox/ and bpf/ (label
# aggbox.source-digest) and is not rebuilt when the checkout has the same digest; when it
# differs, the engine's layer cache keeps the toolchain layer and only the rest rebuilds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
IMAGE=${AGGBOX_IMAGE:-aggbox:latest}
OFFICIAL_BASE=debian:bookworm-slim
LOCAL_BASE=aggbox-base:bookworm-slim

say() { echo "image: $*"; }

timeout 10 docker version >/dev/null 2>&1 \
    || { echo "image: error: the Docker engine does not answer; run 'sudo make docker-up'" >&2; exit 1; }

DIGEST=$(bash docker/source-digest.sh)
if [[ $(docker image inspect "$IMAGE" --format '{{index .Config.Labels "aggbox.source-digest"}}' \
        2>/dev/null || true) == "$DIGEST" && -z ${FORCE:-} ]]; then
    say "$IMAGE is up to date (source digest $DIGEST)"
    exit 0
fi

if docker image inspect "$OFFICIAL_BASE" >/dev/null 2>&1; then
    BASE=$OFFICIAL_BASE
elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    BASE=$LOCAL_BASE
elif timeout 60 docker pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
    BASE=$OFFICIAL_BASE
else
    say "no registry reachable: building $LOCAL_BASE from Debian's packages"
    bash docker/build-base.sh "$LOCAL_BASE"
    BASE=$LOCAL_BASE
fi

# torch (the CPU build, as pinned for the venv) and scikit-learn for the training workload:
# fetched here, where pip knows the machine's indexes and certificates, not in the build.
PIP_PYTHON=$ROOT/.venv/bin/python
[[ -x $PIP_PYTHON ]] || PIP_PYTHON=python3
rm -rf docker/wheels
say "staging torch and scikit-learn wheels in docker/wheels/"
"$PIP_PYTHON" -m pip download -q --only-binary=:all: -d docker/wheels \
    "torch==2.13.0" "scikit-learn>=1.3" </dev/null

say "building $IMAGE on $BASE (source digest $DIGEST)"
# --network host: build steps reach Debian's mirror without a default bridge or NAT rules.
docker build --network host --build-arg "BASE=$BASE" --build-arg "SOURCE_DIGEST=$DIGEST" \
    -f docker/Dockerfile -t "$IMAGE" .
# The image this build replaced is now untagged: with vfs it holds a full copy on disk.
docker image prune -f --filter "label=aggbox.source-digest" >/dev/null
say "$IMAGE: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
