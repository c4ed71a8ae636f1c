"""CPU cost of an operation: the whole machine's busy CPU time, and each role's own.

On one machine every emulated host shares the same CPUs, so wall time alone measures
the scheduler as much as the system under test. The cost that carries over to real
machines is the CPU time an operation burns, user + system + softirq, on every CPU.

Where the time comes from, and why not ``/proc/stat``:
``/proc/stat`` counts in USER_HZ (10 ms) and, on a tick-accounted kernel (this one:
``CONFIG_TICK_CPU_ACCOUNTING``, no ``IRQ_TIME_ACCOUNTING``), attributes whole 4 ms
ticks. A broadcast costs ~100 us, so its cost would drown in the rounding. The idle
time the cpuidle framework keeps per CPU (``/sys/devices/system/cpu/cpuN/cpuidle/
state*/time``) is exact to the microsecond, and *busy = wall - idle* then holds
everything that is not idle: tasks, softirq (veth delivery, every eBPF program here),
hard irq. One catch: a CPU's idle time is written when it *leaves* idle, so a CPU that
is idle right now shows a stale value. :class:`MachineCpu` therefore keeps one reader
thread pinned to each CPU; a reading wakes each of them, and a CPU running a reader is
not idle, so its figure is current. Where no cpuidle driver exists (some VMs and
containers) the meter falls back to ``/proc/stat`` and says so in :attr:`source`.

Background: whatever else runs (the nodes' own idle loops, the runner, the system)
is measured over a quiet interval with the same meter and subtracted as a rate.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CPU_DIR = Path("/sys/devices/system/cpu")
USER_HZ = os.sysconf("SC_CLK_TCK")


def cpu_count_of(spec: str | Iterable[int] | None) -> int:
    """How many CPUs a CPU list names: "0", "1-3", "0,2-3" or a set; "" or None: all."""
    if spec is None or spec == "":
        return len(os.sched_getaffinity(0))
    if not isinstance(spec, str):
        return len(set(spec))
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return len(cpus)


def concurrency(groups: Iterable[tuple[int, int]]) -> tuple[float, bool]:
    """``(procs_per_cpu, overcommitted)`` for processes that must run at the same time.

    ``groups`` is ``(processes, cpus they may use)`` per placement group (e.g. the root
    alone on CPU 0, the members on CPU 1). ``procs_per_cpu`` is the worst group's ratio;
    the cell is overcommitted when, in any group, more processes must run concurrently
    than there are CPUs for them: then the scheduler's turn-taking is part of the time.
    """
    worst = 0.0
    for procs, cpus in groups:
        if procs <= 0:
            continue
        worst = max(worst, procs / max(1, cpus))
    return round(worst, 3), worst > 1.0


# ----------------------------------------------------------------- the machine ---------


@dataclass(frozen=True)
class CpuReading:
    """One reading of the whole machine: wall clock and busy CPU time, both in ns."""

    wall_ns: int
    busy_ns: int


def _cpuidle_files(cpu: int) -> list[Path]:
    return sorted((CPU_DIR / f"cpu{cpu}" / "cpuidle").glob("state*/time"))


def _read_idle_us(files: list[Path]) -> int:
    return sum(int(f.read_text()) for f in files)


def _proc_stat_busy_ns() -> int:
    """user + nice + system + irq + softirq of all CPUs (USER_HZ ticks -> ns)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) * (1_000_000_000 // USER_HZ)


class _PinnedReader(threading.Thread):
    """A thread pinned to one CPU that reads that CPU's idle time when asked."""

    def __init__(self, cpu: int, files: list[Path]):
        super().__init__(name=f"cpu-meter-{cpu}", daemon=True)
        self.cpu, self.files = cpu, files
        self.ask, self.answered = threading.Event(), threading.Event()
        self.value: tuple[int, int] = (0, 0)  # (monotonic ns, idle us)
        self.stopping = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            os.sched_setaffinity(0, {self.cpu})  # this thread only
        except OSError as exc:
            self.error = exc
        while True:
            self.ask.wait()
            self.ask.clear()
            if self.stopping:
                return
            try:
                self.value = (time.monotonic_ns(), _read_idle_us(self.files))
            except OSError as exc:
                self.error = exc
            self.answered.set()


class MachineCpu:
    """Busy CPU time of the whole machine, exact to the microsecond where cpuidle exists.

    Use as a context manager (it starts one reader thread per CPU), or call
    :meth:`close`. :meth:`read` takes about 50-100 us (it wakes every CPU).
    """

    def __init__(self, force_proc_stat: bool = False):
        self.cpus = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
        files = {cpu: _cpuidle_files(cpu) for cpu in self.cpus}
        self.readers: list[_PinnedReader] = []
        self.source = "proc_stat"
        if not force_proc_stat and all(files.values()):
            self.readers = [_PinnedReader(cpu, files[cpu]) for cpu in self.cpus]
            for r in self.readers:
                r.start()
            if self._read_cpuidle() is not None:
                self.source = "cpuidle"
            else:
                self.close()

    def _read_cpuidle(self) -> CpuReading | None:
        for r in self.readers:
            r.answered.clear()
            r.ask.set()
        busy = 0
        t_first = None
        for r in self.readers:
            if not r.answered.wait(2.0) or r.error is not None:
                return None
            t_ns, idle_us = r.value
            t_first = t_ns if t_first is None else min(t_first, t_ns)
            # per CPU: time elapsed since an arbitrary origin minus idle; deltas cancel it
            busy += t_ns - idle_us * 1000
        return CpuReading(wall_ns=t_first or time.monotonic_ns(), busy_ns=busy)

    def read(self) -> CpuReading:
        if self.source == "cpuidle":
            reading = self._read_cpuidle()
            if reading is not None:
                return reading
            self.close()  # a reader failed (CPU went offline?): fall back for good
        return CpuReading(wall_ns=time.monotonic_ns(), busy_ns=_proc_stat_busy_ns())

    def close(self) -> None:
        for r in self.readers:
            r.stopping = True
            r.ask.set()
        for r in self.readers:
            r.join(1.0)
        self.readers = []
        self.source = "proc_stat"

    def __enter__(self) -> MachineCpu:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------- accounting ----------


@dataclass
class Tally:
    """Busy CPU, wall time, operations and windows accumulated under one key."""

    busy_ns: int = 0
    wall_ns: int = 0
    ops: int = 0
    windows: int = 0

    def as_dict(self) -> dict:
        return {"busy_ns": self.busy_ns, "wall_ns": self.wall_ns, "ops": self.ops,
                "windows": self.windows}


@dataclass
class CpuAccount:
    """Whole-machine CPU per key (a system), over windows that may interleave.

    ``with account.window("tcp", n_ops=10): ...`` bills the machine's busy time during
    the block to ``tcp``. :meth:`calibrate` measures, with the same meter, the idle
    machine's background rate and the cost of one window's two readings; both are
    subtracted by :meth:`per_op_us`.
    """

    meter: MachineCpu
    background_rate: float = 0.0  # busy ns per wall ns while nothing is measured
    window_overhead_ns: float = 0.0  # busy ns one empty window costs beyond background
    tallies: dict[str, Tally] = field(default_factory=dict)

    def calibrate(self, seconds: float = 0.3, empty_windows: int = 20) -> None:
        a = self.meter.read()
        time.sleep(seconds)
        b = self.meter.read()
        self.background_rate = max(0.0, (b.busy_ns - a.busy_ns) / max(1, b.wall_ns - a.wall_ns))
        extra = []
        for _ in range(empty_windows):
            x = self.meter.read()
            y = self.meter.read()
            extra.append((y.busy_ns - x.busy_ns) - self.background_rate * (y.wall_ns - x.wall_ns))
        extra.sort()
        self.window_overhead_ns = max(0.0, extra[len(extra) // 2]) if extra else 0.0

    @contextlib.contextmanager
    def window(self, key: str, n_ops: int) -> Iterator[None]:
        a = self.meter.read()
        try:
            yield
        finally:
            b = self.meter.read()
            t = self.tallies.setdefault(key, Tally())
            t.busy_ns += b.busy_ns - a.busy_ns
            t.wall_ns += b.wall_ns - a.wall_ns
            t.ops += n_ops
            t.windows += 1

    def per_op_us(self, key: str) -> float:
        t = self.tallies.get(key)
        if t is None:
            return float("nan")
        return cpu_us_per_op(t.busy_ns, t.wall_ns, t.ops, self.background_rate,
                             self.window_overhead_ns * t.windows)

    def as_dict(self) -> dict:
        """What a node emits: the tallies and the calibration, for the runner to divide."""
        return {"source": self.meter.source, "background_rate": self.background_rate,
                "window_overhead_ns": self.window_overhead_ns,
                "tallies": {k: t.as_dict() for k, t in self.tallies.items()}}


def cpu_us_per_op(busy_ns: float, wall_ns: float, ops: int, background_rate: float = 0.0,
                  overhead_ns: float = 0.0) -> float:
    """Busy CPU per operation in us, less the background and the meter's own cost."""
    if ops <= 0:
        return float("nan")
    own = busy_ns - background_rate * wall_ns - overhead_ns
    return max(0.0, own) / ops / 1e3


def per_op_from_dict(account: dict, key: str) -> float:
    """:meth:`CpuAccount.per_op_us` for an account a node emitted as JSON."""
    t = account.get("tallies", {}).get(key)
    if not t:
        return float("nan")
    return cpu_us_per_op(t["busy_ns"], t["wall_ns"], t["ops"], account["background_rate"],
                         account["window_overhead_ns"] * t["windows"])


@dataclass
class ProcessCpu:
    """This process's own CPU time (all its threads, user + system) per key.

    A role's CPU: each node bills the CPU it spends in a system's blocks to that system.
    Softirq work the kernel happens to run in the process's context is included, as the
    kernel bills it (tick accounting: statistically, not exactly).
    """

    tallies: dict[str, Tally] = field(default_factory=dict)

    @contextlib.contextmanager
    def window(self, key: str, n_ops: int) -> Iterator[None]:
        c0, t0 = time.process_time_ns(), time.monotonic_ns()
        try:
            yield
        finally:
            t = self.tallies.setdefault(key, Tally())
            t.busy_ns += time.process_time_ns() - c0
            t.wall_ns += time.monotonic_ns() - t0
            t.ops += n_ops
            t.windows += 1

    def as_dict(self) -> dict:
        return {k: t.as_dict() for k, t in self.tallies.items()}


def role_us_per_op(tallies: Iterable[dict], key: str) -> float:
    """CPU of one role per operation: the sum over the role's processes (each a
    :meth:`ProcessCpu.as_dict`) for ``key``, divided by the operations one of them saw."""
    busy, ops = 0, 0
    for t in tallies:
        entry = t.get(key)
        if entry:
            busy += entry["busy_ns"]
            ops = max(ops, entry["ops"])
    return busy / ops / 1e3 if ops else float("nan")


def load_snapshot() -> dict:
    """Load average and cumulative steal time, for a result's metadata (before and after)."""
    with contextlib.suppress(OSError):
        one, five, fifteen = os.getloadavg()
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        steal_s = int(fields[7]) / USER_HZ if len(fields) > 7 else 0.0
        return {"loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)],
                "steal_s": steal_s, "time": time.time()}
    return {}
