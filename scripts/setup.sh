#!/usr/bin/env bash
# Prepare this machine and the project's .venv for AggBox (called by `make setup`).
#
# Idempotent: every step first checks whether it is already done, and the slow one (pip)
# is skipped through a stamp under .stamps/ keyed on a hash of what it depends on, so a
# second run takes well under two seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

VENV=.venv
STAMPS=.stamps
SYSTEM_PYTHON=/usr/bin/python3   # BCC (python3-bpfcc) imports only under Debian's Python

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

preflight() {
    [[ $(uname -s) == Linux ]] || die "AggBox needs Linux (eBPF); this is $(uname -s)."
    [[ $EUID -eq 0 ]] || die "run as root: sudo make setup"
    if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
        die "needs a Debian-like system with apt; install by hand: ${PACKAGES[*]}"
    fi
}

# (a) Debian packages. dpkg-query is fast and sees removals, so no stamp is needed here.
ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)
PACKAGES=(clang llvm libbpf-dev bpftool python3-bpfcc bpfcc-tools iproute2 ethtool
          "linux-headers-$ARCH" python3-venv python3-pip util-linux kmod
          # What nodes import under Debian's Python on docker and Ansible hosts, and sshd
          # for the local stand-ins of cloud VMs (they share this machine's packages).
          python3-numpy python3-pyroute2 python3-yaml openssh-server
          # `make lint` (ruff, yamllint and ansible-lint come from PyPI with the dev extra).
          shellcheck)

missing_packages() {
    local installed
    # dpkg-query exits 1 when some package is unknown; its output is still what we need.
    installed=$({ dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" \
        2>/dev/null || true; } | awk '$2 == "installed" {print $1}')
    for pkg in "${PACKAGES[@]}"; do
        grep -qxF "$pkg" <<<"$installed" || echo "$pkg"
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    [[ ${#missing[@]} -eq 0 ]] && return
    say "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" </dev/null
}

# (b) BCC compiles against /lib/modules/$(uname -r)/build. Kernels without their own
# headers borrow Debian's newest linux-headers-*-$ARCH (see docs/kernel.md, "Toolchain").
newest_headers() {
    find /usr/src -maxdepth 1 -name "linux-headers-*-$ARCH" | sort -V | tail -n 1
}

has_real_headers() {
    local build=$1
    [[ -d $build/include ]] || return 1
    # A link to some other kernel's Debian headers is ours to refresh; anything else
    # (a real folder, or headers made for this very kernel) is never touched.
    [[ -L $build ]] || return 0
    [[ $(readlink "$build") != /usr/src/linux-headers-*-"$ARCH" ]] \
        || [[ $(readlink "$build") == "/usr/src/linux-headers-$(uname -r)" ]]
}

link_headers() {
    local moddir arch_dir common_dir
    moddir="/lib/modules/$(uname -r)"
    has_real_headers "$moddir/build" && return
    arch_dir=$(newest_headers)
    [[ -n $arch_dir ]] || die "no /usr/src/linux-headers-*-$ARCH; install linux-headers-$ARCH"
    common_dir=${arch_dir%-"$ARCH"}-common
    [[ -d $common_dir ]] || die "$common_dir is missing; reinstall linux-headers-$ARCH"
    mkdir -p "$moddir"
    # An empty placeholder folder would make ln put the link inside it.
    [[ -d $moddir/build && ! -L $moddir/build ]] && { rmdir "$moddir/build" || die "$moddir/build is a folder without headers; move it away"; }
    [[ -d $moddir/source && ! -L $moddir/source ]] && { rmdir "$moddir/source" || die "$moddir/source is a folder that is not ours; move it away"; }
    if [[ $(readlink "$moddir/build" || true) != "$arch_dir" ]]; then
        say "kernel headers: $moddir/build -> $arch_dir"
        ln -sfn "$arch_dir" "$moddir/build"
    fi
    [[ $(readlink "$moddir/source" || true) == "$common_dir" ]] || ln -sfn "$common_dir" "$moddir/source"
}

# (c) The virtual environment, with the system site-packages so that `import bcc` works.
make_venv() {
    if "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        return  # a working venv is reused as it is
    fi
    say "creating $VENV from $SYSTEM_PYTHON (with system site-packages, for BCC)"
    rm -rf "$VENV" "$STAMPS"/pip-*
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
}

# The package and its dependencies, from requirements.lock (pinned, hashed: `make lock`
# regenerates it), then aggbox itself without dependencies (editable).
pip_install() {
    local key stamp
    key=$(cat pyproject.toml requirements.lock "$VENV/pyvenv.cfg" | sha256sum | cut -c1-16)
    stamp="$STAMPS/pip-$key"
    [[ -f $stamp && -x $VENV/bin/aggbox ]] && return
    say "installing the locked dependencies (requirements.lock) into $VENV"
    "$VENV/bin/python" -m pip install -q --require-hashes -r requirements.lock </dev/null
    say "installing the aggbox package (editable) into $VENV"
    "$VENV/bin/python" -m pip install -q --no-deps -e . </dev/null
    mkdir -p "$STAMPS"
    rm -f "$STAMPS"/pip-*
    touch "$stamp"
}

# (c2) torch, for the gloo baseline and the training workload only (the aggbox[torch]
# extra). PyPI's torch is a multi-GB CUDA build on most machines, so by default it comes
# from PyTorch's CPU wheel index, and only when that index answers. AGGBOX_TORCH:
#   auto (default)  CPU index if reachable, else a CPU build the configured index
#                   resolves the pin to (some machines hold one locally), else skip
#                   (say so): never the CUDA build unasked
#   cpu             CPU index, fail if unreachable
#   pypi            the configured index (PyPI): on machines that hold the CPU build of
#                   the pinned version locally (this project's CI) that is what pip takes
#   no              skip
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

torch_pin() {
    sed -n 's/^torch = \["\(torch==[^"]*\)"\]$/\1/p' pyproject.toml
}

# The version pip would install for the pin from the configured index, without
# installing it: "2.13.0+cpu" where a CPU build is held, "2.13.0" for PyPI's CUDA build.
torch_resolves_to() {
    local report
    report=$(mktemp)
    "$VENV/bin/python" -m pip install -q --dry-run --no-deps --ignore-installed \
        --report "$report" "$1" </dev/null >/dev/null 2>&1 || true
    "$VENV/bin/python" -c 'import json, sys
try:
    print(json.load(open(sys.argv[1]))["install"][0]["metadata"]["version"])
except Exception:
    pass' "$report"
    rm -f "$report"
}

torch_install() {
    local mode=${AGGBOX_TORCH:-auto} pin have
    pin=$(torch_pin)
    [[ -n $pin ]] || die "no torch pin in pyproject.toml's torch extra"
    # Asked of the package metadata: importing torch would take seconds.
    have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' \
        2>/dev/null || true)
    if [[ -n $have && $pin == "torch==${have%%+*}" ]]; then
        return  # already there, whatever index it came from
    fi
    case $mode in
        no)
            say "torch: skipped (AGGBOX_TORCH=no); the gloo baseline and the training workload need it"
            return ;;
        auto|cpu)
            if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$TORCH_CPU_INDEX/torch/', timeout=10)" \
                    2>/dev/null; then
                say "torch: installing $pin from PyTorch's CPU index ($TORCH_CPU_INDEX)"
                "$VENV/bin/python" -m pip install -q --extra-index-url "$TORCH_CPU_INDEX" "$pin" </dev/null
                return
            fi
            [[ $mode == cpu ]] && die "torch: PyTorch's CPU index ($TORCH_CPU_INDEX) does not answer"
            if [[ $(torch_resolves_to "$pin") == *+cpu ]]; then
                say "torch: installing $pin, a CPU build the configured index holds" \
                    "(PyTorch's CPU index does not answer)"
                "$VENV/bin/python" -m pip install -q "$pin" </dev/null
                return
            fi
            say "torch: not installed: PyTorch's CPU index ($TORCH_CPU_INDEX) does not answer, and" \
                "PyPI's torch is a multi-GB CUDA build on most machines. The gloo baseline and the" \
                "training workload need it: 'AGGBOX_TORCH=pypi make setup' installs $pin from PyPI."
            return ;;
        pypi)
            say "torch: installing $pin from the configured index (AGGBOX_TORCH=pypi)"
            "$VENV/bin/python" -m pip install -q "$pin" </dev/null
            return ;;
        *) die "AGGBOX_TORCH=$mode: expected auto, cpu, pypi or no" ;;
    esac
}

# (d) The one thing everything else relies on.
verify() {
    "$VENV/bin/python" -c 'import bcc, pyroute2' 2>/dev/null && return
    die "$VENV/bin/python cannot import bcc and pyroute2: check that python3-bpfcc is" \
        "installed and $VENV was made from $SYSTEM_PYTHON with --system-site-packages" \
        "(fix: rm -rf $VENV && sudo make setup)"
}

# (e) The allreduce edge's C loops (aggbox/native.py), built now rather than by the
# first allreduce; cached per machine, so this is instant once done. Without a compiler
# the numpy path does the same work: say so, do not fail.
build_edge() {
    say "allreduce edge: $("$VENV/bin/python" -c 'from aggbox import native; print(native.status())')"
}

main() {
    preflight
    install_packages
    link_headers
    make_venv
    pip_install
    torch_install
    verify
    build_edge
    say "ready (run 'make help' to see what to do next)"
}

# Sourcing the file (for tests) defines the functions without running anything.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
