"""``python -m aggbox.remote start|follow|stop|stop-all``: node processes on Ansible hosts.

On a cloud VM a node must outlive the SSH connection that started it, and leave its output
behind for ``fetch.yml``. So ``playbooks/run.yml`` does not run ``aggbox.node`` itself: it
runs ``aggbox.remote start``, which starts the node detached (its own session), with its
JSON lines in ``DIR/out.jsonl``, its stderr in ``DIR/err.log``, its PID in ``DIR/pid`` and,
once it exits, its exit code in ``DIR/rc``. The controller then streams the records with
``aggbox.remote follow`` over SSH, which exits with the node's exit code, so to the
controller a remote node looks like a local process (aggbox.testbed.ansible.RemoteNode).

Standard library only, and nothing else from aggbox: this runs on the hosts with their
Debian Python.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.01


def start(folder: Path, argv: list[str], env: dict[str, str]) -> int:
    """Start ``argv`` detached, supervised; return once its PID is recorded."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("out.jsonl", "err.log", "pid", "rc"):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    if os.fork() == 0:  # the supervisor: its own session, no terminal, no SSH channel
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _supervise(folder, argv, env)
        os._exit(0)
    os.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (folder / "pid").exists() or (folder / "rc").exists():
            print(json.dumps({"dir": str(folder), "pid": _read_int(folder / "pid")}))
            return 0
        time.sleep(POLL_S)
    print(f"aggbox.remote: {argv[0]} did not start within 10 s", file=sys.stderr)
    return 1


def _supervise(folder: Path, argv: list[str], env: dict[str, str]) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    with open(folder / "out.jsonl", "wb") as out, open(folder / "err.log", "wb") as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env={**os.environ, **env}, cwd=folder)
        except OSError as exc:
            err.write(f"aggbox.remote: cannot start {argv[0]}: {exc}\n".encode())
            err.flush()
            _write_atomic(folder / "rc", "127")
            return
        _write_atomic(folder / "pid", str(proc.pid))
        code = proc.wait()
    _write_atomic(folder / "rc", str(code if code >= 0 else 128 - code))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def follow(folder: Path, timeout_s: float | None = None) -> int:
    """Copy ``out.jsonl`` to stdout as it grows; at the node's exit copy ``err.log`` to
    stderr and exit with the node's exit code."""
    out_path, rc_path = folder / "out.jsonl", folder / "rc"
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    sink = sys.stdout.buffer
    offset = 0
    while True:
        finished = rc_path.exists()  # checked before the last read: nothing is lost
        with contextlib.suppress(FileNotFoundError), open(out_path, "rb") as f:
            f.seek(offset)
            data = f.read()
            if data:
                sink.write(data)
                sink.flush()
                offset += len(data)
        if finished:
            break
        if deadline is not None and time.monotonic() > deadline:
            print(f"aggbox.remote: {folder} still running after {timeout_s} s", file=sys.stderr)
            return 124
        time.sleep(POLL_S)
    with contextlib.suppress(FileNotFoundError):
        sys.stderr.buffer.write((folder / "err.log").read_bytes())
    sys.stderr.flush()
    return _read_int(rc_path) or 0


def stop(folder: Path, sig: int = signal.SIGTERM) -> int:
    """Signal the node of ``folder`` if it still runs."""
    pid = _read_int(folder / "pid")
    if pid is None or (folder / "rc").exists():
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    return 0


def stop_all(root: Path, grace_s: float = 3.0) -> int:
    """SIGTERM every node under ``root`` still running, SIGKILL what is left after
    ``grace_s``; prints how many were stopped (teardown.yml)."""
    folders = [p.parent for p in root.rglob("pid") if not (p.parent / "rc").exists()]
    for folder in folders:
        stop(folder)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(not (f / "rc").exists() for f in folders):
        time.sleep(0.05)
    for folder in folders:
        stop(folder, signal.SIGKILL)
    print(json.dumps({"stopped": len(folders)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aggbox.remote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("start", help="start a node detached: start --dir D [--env K=V] -- ARGV")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("follow", help="stream a node's records; exit with its exit code")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--timeout", type=float)
    p = sub.add_parser("stop", help="signal a node")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--signal", default="TERM", choices=("TERM", "KILL"))
    p = sub.add_parser("stop-all", help="stop every node under a folder")
    p.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.action == "start":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            parser.error("start needs the command after --")
        env = dict(item.split("=", 1) for item in args.env)
        return start(args.dir, command, env)
    if args.action == "follow":
        return follow(args.dir, args.timeout)
    if args.action == "stop":
        return stop(args.dir, signal.SIGKILL if args.signal == "KILL" else signal.SIGTERM)
    return stop_all(args.root)


if __name__ == "__main__":
    sys.exit(main())
