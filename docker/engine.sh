#!/usr/bin/env bash
# Start or stop the Docker engine for the docker testbed (`make docker-up` / `make docker-down`).
#
# up:   installs Debian's docker.io when dockerd is missing, then starts dockerd with the vfs
#       storage driver (the only one that works on this kind of machine, where overlayfs
#       inside the sandbox is refused), no default bridge, and no iptables/ip-forward
#       changes: the machine's firewall and routing stay as they are, and testbed networks
#       are internal bridges whose traffic never leaves them. Idempotent: an engine that
#       already answers is used as it is, whoever started it.
# down: stops the dockerd that `up` started (its pid file), and only that one. Images stay
#       (they are the cache that makes the next `make image` fast).
set -euo pipefail

STATE=/run/aggbox
PIDFILE=$STATE/dockerd.pid
LOG=/var/log/aggbox-dockerd.log
SOCK=/var/run/docker.sock

say() { echo "docker-engine: $*"; }
die() { echo "docker-engine: error: $*" >&2; exit 1; }

answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

our_pid() {
    local pid
    [[ -f $PIDFILE ]] || return 1
    pid=$(cat "$PIDFILE")
    [[ -n $pid && -d /proc/$pid ]] && grep -q dockerd "/proc/$pid/comm" 2>/dev/null || return 1
    echo "$pid"
}

install_engine() {
    command -v dockerd >/dev/null && command -v docker >/dev/null && return
    say "installing Debian's docker.io engine"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io </dev/null
    command -v dockerd >/dev/null || die "docker.io installed but no dockerd on PATH"
}

up() {
    [[ $EUID -eq 0 ]] || die "run as root: sudo make docker-up"
    install_engine
    if answers; then
        say "engine already running ($(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}'))"
        return
    fi
    mkdir -p "$STATE"
    # A socket left by a dead engine would make the new one refuse to start.
    if [[ -S $SOCK ]] && ! our_pid >/dev/null && ! pgrep -x dockerd >/dev/null; then rm -f "$SOCK"; fi
    say "starting dockerd (vfs storage, no default bridge, no iptables changes); log: $LOG"
    setsid dockerd --storage-driver=vfs --bridge=none --iptables=false --ip-forward=false \
        --ip-masq=false --userland-proxy=false --pidfile="$PIDFILE" \
        </dev/null >>"$LOG" 2>&1 &
    for _ in $(seq 1 60); do
        answers && { say "engine up: $(docker version --format '{{.Server.Version}}')"; return; }
        sleep 0.5
    done
    tail -n 20 "$LOG" >&2 || true
    die "dockerd did not answer within 30 s (log above, full log in $LOG)"
}

down() {
    local pid
    if ! pid=$(our_pid); then
        if answers; then
            say "the running engine was not started by 'make docker-up'; leaving it alone"
        else
            say "no engine running"
        fi
        rm -f "$PIDFILE"
        return
    fi
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
        [[ -d /proc/$pid ]] || { rm -f "$PIDFILE"; say "engine stopped"; return; }
        sleep 0.5
    done
    die "dockerd (pid $pid) still running after 30 s; see $LOG"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) if answers; then say "running"; else say "not running"; exit 1; fi ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
