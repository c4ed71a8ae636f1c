"""What a run records about the machine it ran on: kernel, CPUs, tick, git, versions."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime
from pathlib import Path

from aggbox import ROOT, __version__
from aggbox.cpu import USER_HZ, MachineCpu


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _run_quietly(argv: list[str], cwd: Path | None = None) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def machine_info() -> dict:
    uname = platform.uname()
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    config_hz, hz_source = kernel_hz()
    return {
        "hostname": socket.gethostname(),
        "kernel": uname.release,
        "kernel_version": uname.version,
        "arch": uname.machine,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "runner_cpus": sorted(os.sched_getaffinity(0)),
        # The scheduler tick (CONFIG_HZ) sets how long a preempted process waits for its
        # turn; USER_HZ is the unit of /proc/stat, the CPU meter's fallback.
        "config_hz": config_hz,
        "config_hz_source": hz_source,
        "user_hz": USER_HZ,
        "cpu_meter": cpu_meter_source(),
    }


def kernel_hz() -> tuple[int | None, str | None]:
    """CONFIG_HZ of the running kernel and the file it was read from; None where unreadable."""
    import gzip

    candidates = [
        (Path("/proc/config.gz"), gzip.open),
        (Path(f"/boot/config-{platform.release()}"), open),
    ]
    for path, opener in candidates:
        try:
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1]), str(path)
        except (OSError, ValueError, EOFError):
            continue
    return None, None


def cpu_meter_source() -> str | None:
    """What aggbox.cpu.MachineCpu measures with here: "cpuidle" (exact) or "proc_stat"."""
    try:
        with MachineCpu() as meter:
            return meter.source
    except Exception:  # metadata must never stop a run
        return None


def git_info() -> dict:
    revision = _run_quietly(["git", "rev-parse", "HEAD"], cwd=ROOT)
    status = _run_quietly(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT)
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    """Versions of what shapes the numbers; None where absent (never an error)."""
    from importlib import metadata

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    clang = _run_quietly(["clang", "--version"])
    return {
        "python": platform.python_version(),
        "aggbox": __version__,
        "bcc": dist("bcc"),
        "clang": clang.splitlines()[0] if clang else None,
        "torch": dist("torch"),
        "numpy": dist("numpy"),
        "pandas": dist("pandas"),
        "pyarrow": dist("pyarrow"),
    }
