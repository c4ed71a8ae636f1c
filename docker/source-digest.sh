#!/usr/bin/env bash
# The digest of what the image carries from the checkout (aggbox/*.py, bpf/*.c|h, the check).
# aggbox.testbed.docker.source_digest() computes the same value, to tell a stale image.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
find aggbox bpf docker/bpf-check -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name '*.sh' \) \
    -not -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
