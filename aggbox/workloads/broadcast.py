"""The broadcast micro-benchmark: one root sends, every other host receives.

For each system (AggBox or a baseline, all behind the same Broadcaster/Receiver
interface) the root broadcasts ``warmup + iters`` messages, one at a time, interleaved
with the other systems in blocks of :data:`BLOCK` (warm-up blocks first, then the
measured ones; a block is never part warm-up, part measured). Per message it records:

- completion: from the start of ``send`` until the root knows every member has it, in
  the sense of the system's :data:`PROMISES`: ``kernel`` (every member's kernel holds
  the bytes: AggBox's group ACK, TCP's ACKs) or ``app`` (every member's application
  read them and answered);
- delivery: from the start of ``send`` until the LAST member's application has it
  (namespaces share one monotonic clock, so this is exact);
- the root thread's CPU time inside ``send``.

Receivers (members' applications):

- ``idle``: blocked in recv; the kernel wakes them.
- ``busy``: *unavailable*, not consuming CPU. Each member sleeps to its next 1 ms boundary
  on the absolute monotonic clock, shifted by a per-member phase drawn from a seeded RNG
  keyed by its rank, then polls its socket once without blocking (after a message it
  polls again at once: it takes what is queued, then goes back to sleep). A member's
  application therefore sees a message up to 1 ms late, as if it had been computing, but
  the CPUs stay free, so 15 members on one CPU do not make the scheduler part of the
  measurement (the old model did: see ``spin``).
- ``spin``: the old model, kept under its own name: compute in 1 ms units of CPU-bound
  work, poll between units. It saturates the members' CPUs, so the whole machine's CPU
  and the members' CPU per operation are not measurable there (reported as NaN).

The gap between a send's completion and the next send is uniform in
``[gap_us, gap_us + gap_jitter_us]`` (default 2-3 ms, seeded): a jitter of one whole busy
unit makes the send times uniform modulo the unit, so sends cannot phase-lock with the
members' wake-ups.

Drain: after each block the root waits until the last member has delivered the block's
last message before the schedule moves on, so no backlog of one system leaks into the
next block. The members say so over a side channel that is not measured: one TCP
connection per member on :data:`CONTROL_PORT` (TCP, so loss on the links cannot lose a
report), one short JSON line per member and block, written after the receive time is
recorded. A member keeps serving a finished block's socket until the next block's first
packet arrives (the root is past the old block by then), and the last one until the
root's "bye": a lost application ACK (udp, mcast) is only re-sent by a receiver that
still reads, as a real application's would be.

CPU per operation (the root reads the whole machine, :mod:`aggbox.cpu`): after every node
is up the root calibrates the idle machine's background while the members wait exactly as
they will during the schedule (blocked, or sleeping-and-polling for ``busy``), so the
busy members' own wake-ups are background and not billed to any system. Each block then
runs inside ``account.window(system, n)`` covering the sends, the gaps AND the drain,
i.e. the window ends when the block is fully DELIVERED to every member's application.
Why the drain is inside: for a kernel-promise system (AggBox, tcp_kack) ``send`` returns
before the members' applications have read the message; their receive work (wake-up,
recvmsg, the copy) happens afterwards. Ending the window at the last completion would
drop that work for the block's last message and flatter exactly the systems whose
completion promises less. With the drain inside, every system's window holds all the
delivery work of all its messages. The drain's own cost (the members' report writes, the
root reading them) is the same for every system; it is measured before the schedule by
``drain_probes`` probe rounds that run the same report path in the same receiver mode,
and the runner subtracts it per window, beside the background and the meter's own cost.
Warm-up blocks are billed to ``warmup:<system>``, never to the system.
Per role: the root bills its own process CPU (sends and gaps, not the drain) and each
member bills its receive work of a block (from waiting for the block's first message to
its last receive, not the report) per system; a busy member's idle polling rate is
measured over the calibration interval and subtracted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import select
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from aggbox.collectives.group import Group, Member, new_job_id, new_token
from aggbox.errors import AggBoxError, CollectiveTimeout
from aggbox.testbed.base import Testbed

BLOCK = 10  # messages per system before the schedule moves on to the next system
BUSY_UNIT_NS = 1_000_000  # a busy member's unit: it looks at its socket once per unit
WORK_UNIT_NS = BUSY_UNIT_NS  # a spinning member's unit of CPU-bound work
RECEIVER_MODES = ("idle", "busy", "spin")
PORTS = {"aggbox": 47000, "udp": 46000, "tcp": 45000, "tcp_kack": 45200, "mcast": 46200}
SYSTEMS = tuple(PORTS)  # order matters: payload() keys its pattern on the index
CONTROL_PORT = 44100  # TCP: the members' "delivered" reports (not measured)
#: what a system's completion means (see the module docstring)
PROMISES = {"aggbox": "kernel", "tcp_kack": "kernel", "tcp": "app", "udp": "app",
            "mcast": "app", "gloo": "app"}
DRAIN_KEY = "_drain"  # the CpuAccount key of the drain probes
PROBE_DELAY_S = 0.005  # a probed member reports this long after it read the probe

T = TypeVar("T")


# ----------------------------------------------------------------- the schedule -------


def make_schedule(systems: list[str], per_system: int, seed: int) -> list[tuple[str, int]]:
    """Blocks of (system, count): every system gets ``per_system`` messages, interleaved
    in a seeded order that changes every round, so drift hits all systems alike."""
    rng = random.Random(seed)
    left = dict.fromkeys(systems, per_system)
    blocks: list[tuple[str, int]] = []
    while any(left.values()):
        order = list(systems)
        rng.shuffle(order)
        for system in order:
            n = min(BLOCK, left[system])
            if n:
                blocks.append((system, n))
                left[system] -= n
    return blocks


def make_block_schedule(systems: list[str], warmup: int, iters: int,
                        seed: int) -> list[tuple[str, int, bool]]:
    """Blocks of (system, count, measured): the warm-up blocks of every system first,
    then the measured ones, each part interleaved as :func:`make_schedule` does."""
    warm = [(s, n, False) for s, n in make_schedule(systems, warmup, seed)]
    return warm + [(s, n, True) for s, n in make_schedule(systems, iters, seed + 1)]


def member_phase_ns(seed: int, rank: int, unit_ns: int = BUSY_UNIT_NS) -> int:
    """A busy member's phase in [0, unit): seeded, and keyed by rank so members differ."""
    return random.Random(f"busy-phase:{seed}:{rank}").randrange(unit_ns)


def next_wakeup_ns(now_ns: int, phase_ns: int, unit_ns: int = BUSY_UNIT_NS) -> int:
    """The first instant strictly after ``now_ns`` on the grid ``phase + k * unit``."""
    return now_ns - (now_ns - phase_ns) % unit_ns + unit_ns


def make_gaps(n: int, lo_us: float, jitter_us: float, seed: int) -> list[int]:
    """``n`` pauses (ns) between a send's completion and the next send: uniform in
    ``[lo, lo + jitter]``, seeded. A jitter of a whole busy unit spreads the send times
    uniformly over the unit, so they cannot phase-lock with the members' wake-ups."""
    rng = random.Random(f"gaps:{seed}")
    return [int((lo_us + rng.random() * jitter_us) * 1000) for _ in range(n)]


def payload(system: str, index: int, size: int) -> bytes:
    """The exact bytes of message ``index`` of ``system``, which receivers check."""
    start = (index * 31 + SYSTEMS.index(system) * 7) % 256
    pattern = bytes((start + j) % 256 for j in range(256))
    return (pattern * (size // 256 + 1))[:size]


def group_for(spec: dict, system: str, rank: int) -> Group:
    base = Group.from_dict(spec["group"])
    return replace(base, rank=rank, port=PORTS[system])


def block_key(system: str, measured: bool) -> str:
    """The CPU key a block is billed to: warm-up never counts for the system."""
    return system if measured else f"warmup:{system}"


# ----------------------------------------------------------------- availability -------


class Availability:
    """When a member's application looks at its sockets (see the module docstring)."""

    def __init__(self, mode: str, phase_ns: int = 0, unit_ns: int = BUSY_UNIT_NS):
        if mode not in RECEIVER_MODES:
            raise AggBoxError(f"unknown receivers mode {mode!r}; known: "
                              f"{', '.join(RECEIVER_MODES)}")
        self.mode, self.phase_ns, self.unit_ns = mode, phase_ns, unit_ns
        self.awake = False  # busy: the last poll found something, so look again at once

    def wait(self, poll: Callable[[], T | None], block: Callable[[float], T | None],
             timeout_s: float) -> T | None:
        """The next thing ``poll`` (non-blocking) or ``block(timeout)`` returns, or None
        after ``timeout_s``."""
        if self.mode == "idle":
            return block(timeout_s)
        give_up = time.monotonic_ns() + int(timeout_s * 1e9)
        if self.mode == "spin":
            while time.monotonic_ns() < give_up:
                end = time.perf_counter_ns() + self.unit_ns
                while time.perf_counter_ns() < end:
                    pass
                got = poll()
                if got is not None:
                    return got
            return None
        if self.awake:
            got = poll()
            if got is not None:
                return got
        self.awake = False
        while True:
            now = time.monotonic_ns()
            if now >= give_up:
                return None
            wake = next_wakeup_ns(now, self.phase_ns, self.unit_ns)
            time.sleep((wake - now) / 1e9)
            got = poll()
            if got is not None:
                self.awake = True
                return got


def _tight_timers() -> None:
    """Timer slack 1 ns (default 50 us): the busy grid and the gaps are then on time."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK


# ----------------------------------------------------------------- the side channel ---


class _Lines:
    """JSON lines over one TCP socket, both ways."""

    def __init__(self, sock: socket.socket, who: str):
        self.sock, self.who = sock, who
        self.buf = bytearray()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, msg: dict) -> None:
        self.sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def take(self) -> dict | None:
        end = self.buf.find(b"\n")
        if end < 0:
            return None
        line = bytes(self.buf[:end])
        del self.buf[:end + 1]
        return json.loads(line)

    def fill(self, flags: int = 0) -> bool:
        """One recv into the buffer; False if nothing was there (MSG_DONTWAIT)."""
        try:
            chunk = self.sock.recv(65536, flags)
        except BlockingIOError:
            return False
        if not chunk:
            raise AggBoxError(f"{self.who} closed the control connection")
        self.buf += chunk
        # The root reads reports; ack them now, inside the drain, not 40 ms later
        # (delayed ACK) in the middle of the next block.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return True

    def poll(self) -> dict | None:
        msg = self.take()
        if msg is None and self.fill(socket.MSG_DONTWAIT):
            msg = self.take()
        return msg

    def read(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while (msg := self.take()) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            self.fill()
        return msg

    def close(self) -> None:
        self.sock.close()


class MemberControl:
    """A member's end: listens on the control port until the root connects."""

    def __init__(self, port: int = CONTROL_PORT):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("0.0.0.0", port))
        self.listener.listen(1)
        self.lines: _Lines | None = None

    def accept(self, timeout: float) -> _Lines:
        if not select.select([self.listener], [], [], timeout)[0]:
            raise AggBoxError(f"the root did not open the control connection in {timeout} s")
        conn, _ = self.listener.accept()
        self.lines = _Lines(conn, "the root")
        return self.lines

    def close(self) -> None:
        if self.lines:
            self.lines.close()
        self.listener.close()


class RootControl:
    """The root's end: one connection to every member, and waiting for all their reports."""

    def __init__(self, members: list[Member], port: int, timeout: float):
        self.lines: dict[int, _Lines] = {}
        deadline = time.monotonic() + timeout
        try:
            for m in members:
                self.lines[m.rank] = _Lines(self._connect(m, port, deadline), f"rank {m.rank}")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _connect(m: Member, port: int, deadline: float) -> socket.socket:
        while True:
            try:
                sock = socket.create_connection((m.ip, port), timeout=1.0)
                sock.settimeout(None)
                return sock
            except OSError as exc:  # the member may not be listening yet
                if time.monotonic() >= deadline:
                    raise AggBoxError(f"cannot open the control connection to member rank "
                                      f"{m.rank} ({m.ip}:{port}): {exc}") from exc
                time.sleep(0.05)

    def send_all(self, msg: dict) -> None:
        for lines in self.lines.values():
            lines.send(msg)

    def wait_all(self, match: Callable[[dict], bool], what: str, timeout: float,
                 serve=None) -> None:
        """Until every member sent a line ``match`` accepts; a member's error line raises
        at once, naming it; stale lines are skipped. ``serve``: an endpoint with
        ``fileno()`` and ``serve(seconds)`` (AggBox's Broadcaster) whose socket is served
        meanwhile: a member whose socket dropped a packet its kernel had acknowledged
        NACKs it after the root's send() returned, and only a root that reads answers."""
        waiting = {lines.sock: (rank, lines) for rank, lines in self.lines.items()}
        deadline = time.monotonic() + timeout

        def consume(rank: int, lines: _Lines) -> bool:
            while (msg := lines.take()) is not None:
                if msg.get("error"):
                    raise AggBoxError(f"member rank {rank}: {msg['error']}")
                if match(msg):
                    return True
            return False

        for sock, (rank, lines) in list(waiting.items()):
            if consume(rank, lines):
                del waiting[sock]
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                ranks = sorted(r for r, _ in waiting.values())
                raise AggBoxError(f"{what}: no report from member ranks {ranks} in "
                                  f"{timeout:.0f} s")
            ready = select.select([*waiting, *([serve] if serve else [])], [], [], left)[0]
            if serve is not None and serve in ready:
                serve.serve(0)
            for sock in ready:
                if sock is serve:
                    continue
                rank, lines = waiting[sock]
                lines.fill()
                if consume(rank, lines):
                    del waiting[sock]

    def close(self) -> None:
        for lines in self.lines.values():
            lines.close()


# ----------------------------------------------------------------- node roles ---------


def _programs(spec: dict, rank: int):
    if "aggbox" not in spec["systems"]:
        return None
    from aggbox.collectives.broadcast import BroadcastPrograms

    tag = f"{spec['pin_tag']}-h{rank}" if spec.get("pin_tag") else ""
    return BroadcastPrograms(spec["group"]["ifname"], pin_tag=tag)


def _unknown(system: str) -> AggBoxError:
    return AggBoxError(f"unknown broadcast system {system!r}; known: {', '.join(SYSTEMS)}")


def _sender(system: str, group: Group, programs):
    if system == "aggbox":
        from aggbox.collectives.broadcast import Broadcaster

        return Broadcaster(group, programs)
    if system == "tcp":
        from aggbox.baselines.tcp import TcpBroadcaster

        return TcpBroadcaster(group)
    if system == "tcp_kack":
        from aggbox.baselines.tcp_kack import TcpKackBroadcaster

        return TcpKackBroadcaster(group)
    if system == "udp":
        from aggbox.baselines.udp import UdpBroadcaster

        return UdpBroadcaster(group)
    if system == "mcast":
        from aggbox.baselines.mcast import McastBroadcaster

        return McastBroadcaster(group)
    raise _unknown(system)


def _receiver(system: str, group: Group, programs):
    if system == "aggbox":
        from aggbox.collectives.broadcast import Receiver

        return Receiver(group, programs)
    if system == "tcp":
        from aggbox.baselines.tcp import TcpReceiver

        return TcpReceiver(group)
    if system == "tcp_kack":
        from aggbox.baselines.tcp_kack import TcpKackReceiver

        return TcpKackReceiver(group)
    if system == "udp":
        from aggbox.baselines.udp import UdpReceiver

        return UdpReceiver(group)
    if system == "mcast":
        from aggbox.baselines.mcast import McastReceiver

        return McastReceiver(group)
    raise _unknown(system)


def _close_all(endpoints: dict, programs, control=None) -> None:
    for endpoint in endpoints.values():
        endpoint.close()
    if control is not None:
        control.close()
    if programs is not None:
        programs.close()


def _report(exc: Exception) -> None:
    """Tell the runner about an unexpected exception BEFORE the clean-up: closing our
    sockets makes other nodes fail, and the runner must see that we failed first
    (aggbox/workloads/launcher.py orders failures by when it saw them)."""
    from aggbox.node import emit

    with contextlib.suppress(Exception):
        emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        sys.stdout.flush()


def root_node(spec: dict, rank: int) -> int:
    from aggbox.cpu import CpuAccount, MachineCpu, ProcessCpu
    from aggbox.node import emit, emit_many

    _tight_timers()
    programs = _programs(spec, rank)
    senders: dict = {}
    control = None
    try:
        for system in spec["systems"]:
            senders[system] = _sender(system, group_for(spec, system, rank), programs)
        # Ready before the control connections: a member that never starts must leave a
        # root that can still be interrupted cleanly (tests/kernel/test_broadcast.py).
        emit({"event": "ready"})
        group = Group.from_dict(spec["group"]).with_rank(rank)
        control = RootControl(list(group.receivers), spec.get("control_port", CONTROL_PORT),
                              spec.get("connect_timeout_s", 30.0))
        proc = ProcessCpu()
        with MachineCpu() as meter:
            account = CpuAccount(meter)
            records: list[dict] = []
            try:
                _prepare(spec, control, account)
                error = _send_schedule(spec, senders, control, account, proc, records)
            except AggBoxError as exc:
                error = str(exc)
            cpu = account.as_dict()  # inside: closing the meter resets its source
        emit_many(records)
        done = {"event": "done", "role": "root", "error": error,
                "stats": {s: getattr(b, "stats", {}) for s, b in senders.items()},
                "cpu": cpu, "proc": proc.as_dict()}
        if programs is not None:
            done["counters"] = programs.counters()
        emit(done)
    except Exception as exc:
        _report(exc)
        raise
    finally:
        _close_all(senders, programs, control)
    return 0


def _prepare(spec: dict, control: RootControl, account) -> None:
    """Calibrate the meter while the members wait as they will during the schedule, then
    measure the drain's own cost, then let the members start."""
    timeout = spec["recv_timeout_s"]
    control.send_all({"calibrate": True})
    time.sleep(0.05)  # every member has read it (busy members within a unit)
    account.calibrate(seconds=spec.get("calibrate_s", 0.3))
    for k in range(int(spec.get("drain_probes", 10))):
        control.send_all({"probe": k, "delay_s": PROBE_DELAY_S})
        time.sleep(PROBE_DELAY_S * 0.4)  # they have read it; they report at PROBE_DELAY_S
        with account.window(DRAIN_KEY, 1):
            control.wait_all(lambda m, k=k: m.get("probe") == k, f"drain probe {k}", timeout)
    control.send_all({"start": True})


def _send_schedule(spec: dict, senders: dict, control: RootControl, account, proc,
                   records: list[dict]) -> str | None:
    size, timeout = spec["size"], spec["timeout_s"]
    drain_timeout = spec["recv_timeout_s"] + 5  # a member's own timeout reports first
    schedule = spec["schedule"]
    gaps = iter(make_gaps(sum(n for _, n, _ in schedule), spec["gap_us"],
                          spec.get("gap_jitter_us", 0), spec.get("seed", 0)))
    counts: dict[str, int] = defaultdict(int)
    for block_no, (system, n, measured) in enumerate(schedule):
        sender, key = senders[system], block_key(system, measured)
        with account.window(key, n):
            with proc.window(key, n):
                for _ in range(n):
                    index = counts[system]
                    counts[system] += 1
                    data = payload(system, index, size)
                    t0, c0 = time.monotonic_ns(), time.thread_time_ns()
                    try:
                        sender.send(data, timeout=timeout)
                    except CollectiveTimeout as exc:
                        return f"{system}: {exc}"
                    c1, t1 = time.thread_time_ns(), time.monotonic_ns()
                    records.append({"kind": "send", "system": system, "iter": index,
                                    "t_send_ns": t0, "t_done_ns": t1, "cpu_ns": c1 - c0})
                    time.sleep(max(0, t1 + next(gaps) - time.monotonic_ns()) / 1e9)
            control.wait_all(lambda m, b=block_no: m.get("block") == b,
                             f"{system} block {block_no} (drain)", drain_timeout,
                             serve=sender if hasattr(sender, "serve") else None)
    control.send_all({"bye": True})  # the members may close their sockets now
    return None


def member_node(spec: dict, rank: int) -> int:
    from aggbox.cpu import ProcessCpu
    from aggbox.node import emit, emit_many

    _tight_timers()
    programs = _programs(spec, rank)
    receivers: dict = {}
    control = None
    try:
        for system in spec["systems"]:
            receivers[system] = _receiver(system, group_for(spec, system, rank), programs)
        control = MemberControl(spec.get("control_port", CONTROL_PORT))
        emit({"event": "ready"})
        proc = ProcessCpu()
        records: list[dict] = []
        poll_rate = 0.0
        lines = None
        try:
            lines = control.accept(spec.get("connect_timeout_s", 30.0) + 60)
            avail = Availability(spec["receivers"], member_phase_ns(spec.get("seed", 0), rank))
            poll_rate = _member_prepare(spec, lines, avail)
            error = _receive_schedule(spec, receivers, rank, lines, avail, proc, records)
        except AggBoxError as exc:
            error = str(exc)
        if error and lines is not None:
            with contextlib.suppress(OSError):
                lines.send({"error": error})
        emit_many(records)
        done = {"event": "done", "role": "member", "rank": rank, "error": error,
                "stats": {s: getattr(r, "stats", {}) for s, r in receivers.items()},
                "proc": proc.as_dict(), "poll_rate": poll_rate}
        if programs is not None:
            done["counters"] = programs.counters()
        emit(done)
    except Exception as exc:
        _report(exc)
        raise
    finally:
        _close_all(receivers, programs, control)
    return 0


def _member_prepare(spec: dict, lines: _Lines, avail: Availability) -> float:
    """Wait (in the receivers' mode) through the root's calibration and answer its drain
    probes; return this process's own CPU rate while waiting (ns per ns), which a busy
    member's receive work per block is corrected by."""
    timeout = spec["recv_timeout_s"]

    def next_msg() -> dict:
        msg = avail.wait(lines.poll, lines.read, timeout)
        if msg is None:
            raise AggBoxError(f"no word from the root's control connection in {timeout} s")
        return msg

    msg = next_msg()
    if not msg.get("calibrate"):
        raise AggBoxError(f"unexpected control message {msg}")
    c0, t0 = time.process_time_ns(), time.monotonic_ns()
    msg = next_msg()
    rate = (time.process_time_ns() - c0) / max(1, time.monotonic_ns() - t0)
    while "probe" in msg:
        # Report as after a delivery: busy members at one of their wake-ups, polling
        # (and so loading the machine) as during the schedule until then.
        report_at = time.monotonic_ns() + int(msg["delay_s"] * 1e9)

        def due(at: int = report_at) -> bool | None:
            return True if time.monotonic_ns() >= at else None

        def sleep_until(_timeout: float, at: int = report_at) -> bool:
            time.sleep(max(0, at - time.monotonic_ns()) / 1e9)
            return True

        avail.wait(due, sleep_until, timeout)
        lines.send({"probe": msg["probe"]})
        msg = next_msg()
    if not msg.get("start"):
        raise AggBoxError(f"unexpected control message {msg}")
    return rate if spec["receivers"] == "busy" else 0.0


def _receive_schedule(spec: dict, receivers: dict, rank: int, lines: _Lines,
                      avail: Availability, proc, records: list[dict]) -> str | None:
    size, timeout = spec["size"], spec["recv_timeout_s"]
    counts: dict[str, int] = defaultdict(int)
    previous = None
    for block_no, (system, n, measured) in enumerate(spec["schedule"]):
        receiver = receivers[system]
        with proc.window(block_key(system, measured), n):
            for i in range(n):
                index = counts[system]
                counts[system] += 1
                if i == 0 and previous is not None and previous is not receiver:
                    msg = _first_of_block(avail, receiver, previous, timeout)
                else:
                    msg = avail.wait(lambda r=receiver: r.recv(timeout=0),
                                     lambda t, r=receiver: r.recv(timeout=t), timeout)
                t = time.monotonic_ns()
                if msg is None:
                    return f"{system}: message {index} not received in {timeout} s"
                records.append({"kind": "recv", "system": system, "iter": index, "rank": rank,
                                "t_recv_ns": t, "ok": msg == payload(system, index, size)})
        lines.send({"block": block_no})  # after the receive times: outside every window
        previous = receiver
    if previous is not None:
        _await_bye(lines, previous, avail, timeout)
    return None


def _serve(receiver) -> None:
    """Read a finished block's socket: a receiver that is still read re-sends the ACK of a
    message whose application-level ACK was lost (udp, mcast); nothing new can arrive."""
    if receiver.recv(timeout=0) is not None:
        raise AggBoxError("a message arrived on the socket of a finished block")


def _first_of_block(avail: Availability, receiver, previous, timeout: float) -> bytes | None:
    """The first message of a block, serving the previous block's socket meanwhile.

    A member that delivered a block's last message is not finished with it: if its ACK
    was lost, the root is still in that ``send``, resending, and waits for a receiver that
    reads. Once this block's first packet arrives the root is past it, so from there on
    the receiver is used alone, exactly as for every other message."""

    def poll() -> bytes | None:
        _serve(previous)
        return receiver.recv(timeout=0)

    def block(left_s: float) -> bytes | None:
        deadline = time.monotonic() + left_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = select.select([receiver, previous], [], [], left)[0]
            if previous in ready:
                _serve(previous)
            if receiver in ready:
                return receiver.recv(timeout=max(0.0, deadline - time.monotonic()))

    return avail.wait(poll, block, timeout)


#: how long a member whose last block's socket the root closed waits for the root's bye
BYE_GRACE_S = 5.0


def _await_bye(lines: _Lines, receiver, avail: Availability, timeout: float) -> None:
    """After the last block: serve its socket until the root has completed everything."""

    def serve() -> dict | None:
        # The root closes its sockets as it exits, right after its bye: a TCP receiver
        # can read the close before the control line is read (2 runs in 4 of
        # test_experiment_interrupt's resume on a slow host). The bye, if it came, decides.
        try:
            _serve(receiver)
        except AggBoxError:
            msg = lines.read(BYE_GRACE_S)
            if msg is not None and msg.get("bye"):
                return msg
            raise
        return None

    def poll() -> dict | None:
        msg = lines.poll()
        return serve() if msg is None else msg

    def block(left_s: float) -> dict | None:
        deadline = time.monotonic() + left_s
        while (msg := lines.take()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = select.select([lines.sock, receiver], [], [], left)[0]
            if lines.sock in ready:  # the bye first: it may come with the close
                lines.fill()
                continue
            if receiver in ready and (msg := serve()) is not None:
                return msg
        return msg

    msg = avail.wait(poll, block, timeout)
    if msg is None or not msg.get("bye"):
        raise AggBoxError(f"the root did not finish (control message {msg})")


# ----------------------------------------------------------------- the runner ---------


@dataclass
class BroadcastRun:
    samples: list[dict]
    events: list[dict]  # the nodes' "done" records: stats, kernel counters, CPU, errors
    cpu: dict[str, dict] = field(default_factory=dict)  # per system: the CPU columns
    placement: dict = field(default_factory=dict)  # CPUs applied: root_cpus, member_cpus


def build_spec(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
               seed: int) -> dict:
    members = tuple(Member(rank=h.index, ip=h.ip, mac=h.mac) for h in testbed.hosts)
    # Job id and token from `secrets`, not from the seed: the seed makes the schedule
    # repeatable, it must not make the job's secret predictable (issue 11).
    group = Group(job_id=new_job_id(), token=new_token(),
                  members=members, rank=0, group_ip=testbed.group_ips[0],
                  ifname=testbed.hosts[0].ifname)
    receivers = params.get("receivers", "idle")
    if receivers not in RECEIVER_MODES:
        raise AggBoxError(f"receivers must be one of {', '.join(RECEIVER_MODES)}, "
                          f"not {receivers!r}")
    return {
        "group": json_group(group),
        "systems": list(systems),
        "schedule": make_block_schedule(list(systems), warmup, iters, seed),
        "seed": seed,
        "size": int(params.get("size", 64)),
        "receivers": receivers,
        "gap_us": int(params.get("gap_us", 2000)),
        "gap_jitter_us": int(params.get("gap_jitter_us", 1000)),
        "timeout_s": float(params.get("timeout_s", 10.0)),
        "recv_timeout_s": float(params.get("recv_timeout_s", 60.0)),
        "connect_timeout_s": 30.0,
        "control_port": CONTROL_PORT,
        "drain_probes": int(params.get("drain_probes", 10)),
        "warmup": warmup,
        "placement": params.get("placement", "root-alone"),
        "pin_tag": getattr(testbed, "run_id", ""),
    }


def json_group(group: Group) -> dict:
    return json.loads(group.to_json())


def placement_groups(promise: str, n_members: int, root_cpus: str, member_cpus: str,
                     one_machine: bool) -> list[tuple[int, int]]:
    """``(processes, cpus)`` per placement group of the processes that must run at once
    for one broadcast to complete: the root alone for a kernel promise, root and every
    member for an app promise. Hosts that are real machines run one process each."""
    from aggbox.cpu import cpu_count_of

    if not one_machine:
        return [(1, 1)]
    if not root_cpus and not member_cpus:  # shared: everyone on every CPU
        return [(1 if promise == "kernel" else 1 + n_members, cpu_count_of(""))]
    groups = [(1, cpu_count_of(root_cpus))]
    if promise != "kernel":
        groups.append((n_members, cpu_count_of(member_cpus)))
    return groups


def cpu_columns(events: list[dict], systems: list[str], n_members: int, root_cpus: str,
                member_cpus: str, one_machine: bool, receivers: str) -> dict[str, dict]:
    """Per system, the columns every one of its samples carries: whole-machine and
    per-role CPU per operation, promise, concurrency (see the module docstring)."""
    from aggbox.cpu import concurrency, cpu_us_per_op, per_op_from_dict, role_us_per_op

    root = next((e for e in events if e.get("role") == "root"), {})
    members = [e for e in events if e.get("role") == "member"]
    account = root.get("cpu") or {}
    drain_ns = per_op_from_dict(account, DRAIN_KEY) * 1e3 if account else math.nan
    if math.isnan(drain_ns):
        drain_ns = 0.0
    # A machine already saturated while idle (other load) has no CPU left to measure:
    # every system would read as ~0, which is not a measurement.
    saturated = one_machine and account.get("background_rate", 0.0) > 0.9 * (
        os.cpu_count() or 1)
    out: dict[str, dict] = {}
    for system in systems:
        promise = PROMISES.get(system, "app")
        t = account.get("tallies", {}).get(system)
        machine = math.nan
        if t and receivers != "spin" and not saturated:  # spin saturates the members' CPUs
            overhead = (account["window_overhead_ns"] + drain_ns) * t["windows"]
            machine = cpu_us_per_op(t["busy_ns"], t["wall_ns"], t["ops"],
                                    account["background_rate"], overhead)
        busy, ops = 0.0, 0
        for m in members:
            mt = (m.get("proc") or {}).get(system)
            if mt:
                busy += mt["busy_ns"] - m.get("poll_rate", 0.0) * mt["wall_ns"]
                ops = max(ops, mt["ops"])
        member_us = max(0.0, busy) / ops / 1e3 if ops and receivers != "spin" else math.nan
        procs_per_cpu, overcommitted = concurrency(
            placement_groups(promise, n_members, root_cpus, member_cpus, one_machine))
        out[system] = {
            "cpu_us_per_op": machine,
            "root_cpu_us_per_op": role_us_per_op([root.get("proc") or {}], system),
            "members_cpu_us_per_op": member_us,
            "promise": promise,
            "procs_per_cpu": procs_per_cpu,
            "overcommitted": overcommitted,
            "cpu_source": account.get("source", "none"),
            "root_cpus": root_cpus,
            "member_cpus": member_cpus,
        }
    return out


def run_broadcast(testbed: Testbed, params: dict, systems: list[str], iters: int,
                  warmup: int, seed: int) -> BroadcastRun:
    """Run every system on ``testbed``; return per-message samples and node summaries."""
    from aggbox.workloads.launcher import NodeGroup, cpu_placement

    if len(testbed.hosts) < 2:
        raise AggBoxError("a broadcast needs at least 2 hosts (a root and a member)")
    unknown = [s for s in systems if s not in PORTS]
    if unknown:
        raise _unknown(unknown[0])
    spec = build_spec(testbed, params, systems, iters, warmup, seed)
    root, members = testbed.hosts[0], testbed.hosts[1:]
    per_msg = 0.05 + (spec["gap_us"] + spec["gap_jitter_us"]) / 1e6
    budget = 120 + (warmup + iters) * len(systems) * per_msg
    with NodeGroup(spec) as nodes:
        root_cpus, member_cpus = cpu_placement(testbed.backend, spec["placement"])
        member_nodes = [nodes.start(h, "broadcast-member", h.index, member_cpus)
                        for h in members]
        nodes.wait_ready(member_nodes, timeout=120)
        root_node_ = nodes.start(root, "broadcast-root", root.index, root_cpus)
        nodes.wait_ready([root_node_], timeout=60)
        failed = "broadcast run failed: "
        nodes.wait_exit([root_node_], timeout=budget, prefix=failed)
        # The root's own error (it exited 0), or a member's that came first: the members
        # may wait for a message that never comes, so stop them (NodeGroup's exit).
        nodes.raise_root_cause(failed)
        nodes.wait_exit(member_nodes, timeout=120, prefix=failed)
        nodes.raise_root_cause(failed)
        records = [r for n in nodes.nodes for r in n.records]
    events = [r for r in records if r.get("event") == "done"]
    one_machine = testbed.backend in ("netns", "docker")
    cpu = cpu_columns(events, list(systems), len(members), root_cpus, member_cpus,
                      one_machine, spec["receivers"])
    samples = join_records(records, len(members), warmup)
    for s in samples:
        s.update(cpu[s["system"]])
    return BroadcastRun(samples, events, cpu,
                        {"root_cpus": root_cpus, "member_cpus": member_cpus})


def run_cell(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
             seed: int) -> list[dict]:
    """The experiment runner's entry point (see aggbox/workloads/registry.py)."""
    return run_broadcast(testbed, params, systems, iters, warmup, seed).samples


def join_records(records: list[dict], n_members: int, warmup: int) -> list[dict]:
    """One sample per measured (system, iter): the root's send joined with every
    member's receive."""
    received: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "recv":
            received[(r["system"], r["iter"])].append(r)
    samples = []
    for r in records:
        if r.get("kind") != "send" or r["iter"] < warmup:
            continue
        got = received.get((r["system"], r["iter"]), [])
        delivered = len(got) == n_members and all(g["ok"] for g in got)
        last = max((g["t_recv_ns"] for g in got), default=None)
        samples.append({
            "system": r["system"],
            "iter": r["iter"] - warmup,
            "completion_us": (r["t_done_ns"] - r["t_send_ns"]) / 1e3,
            "delivery_us": (last - r["t_send_ns"]) / 1e3 if delivered and last else None,
            "sender_cpu_us": r["cpu_ns"] / 1e3,
            "delivered": delivered,
        })
    return samples
