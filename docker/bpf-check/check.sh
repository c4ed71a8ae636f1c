#!/usr/bin/env bash
# Compile every bpf/*.c program with plain clang for the BPF target, through bcc_shim.h
# (what that does and does not prove: see the header). Fails on the first broken program
# with clang's own message. Warnings are shown but, as with BCC (which compiles without
# -Werror), do not fail. Usage: check.sh [BPF_DIR]   (default: the repository's bpf/)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BPF_DIR=$(cd "${1:-$HERE/../../bpf}" && pwd)
CLANG=${CLANG:-clang}
command -v "$CLANG" >/dev/null || { echo "bpf-check: no $CLANG (apt-get install clang)" >&2; exit 2; }
[[ -f /usr/include/bpf/bpf_helpers.h ]] \
    || { echo "bpf-check: no /usr/include/bpf/bpf_helpers.h (apt-get install libbpf-dev)" >&2; exit 2; }
MULTIARCH=$(gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null \
    || echo x86_64-linux-gnu)

# BCC programs include <uapi/linux/...> (the kernel tree's name for the UAPI headers);
# here those are the system's /usr/include/linux/... from linux-libc-dev.
INC=$(mktemp -d)
trap 'rm -rf "$INC"' EXIT
ln -s /usr/include "$INC/uapi"

status=0
shopt -s nullglob
for src in "$BPF_DIR"/*.c; do
    if out=$("$CLANG" -target bpf -O2 -g -Wall -Wno-unused-function \
            -Wno-compare-distinct-pointer-types -Wno-unused-variable -Wno-pointer-sign -Wno-gnu-folding-constant \
            -include "$HERE/bcc_shim.h" -I "$INC" -I "/usr/include/$MULTIARCH" -I "$BPF_DIR" \
            -c "$src" -o /dev/null 2>&1); then
        echo "bpf-check: ok     ${src#"$BPF_DIR"/}"
        [[ -z $out ]] || echo "$out"
    else
        echo "bpf-check: BROKEN ${src#"$BPF_DIR"/}" >&2
        echo "$out" >&2
        status=1
    fi
done
exit $status
