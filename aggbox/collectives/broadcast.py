"""In-kernel broadcast with a stateless group acknowledgment.

The root application makes ONE ``sendto`` per packet, to the group's virtual address;
bpf/broadcast.c copies it to every member in the root's kernel, each member's kernel
answers with a cumulative ACK without waking its application, and the root's XDP folds
those ACKs so that its application receives ONE group-ACK when every member has the
packet. See bpf/broadcast.c for exactly what an ACK promises.

Reliability, in layers:
- lost DATA or ACK: the root times out, reads the per-member cumulative ACKs from the
  ``fold`` map and resends only to the members that lack packets (unicast);
- a member whose socket dropped a packet the kernel had acknowledged (checksum, full
  buffer) sees the gap in ``seq`` and sends a NACK; the root keeps recent packets for it;
- duplicates are dropped by the receiver (by seq); a member that never answers ends
  ``send`` with :class:`CollectiveTimeout` naming it.
"""

from __future__ import annotations

import ctypes
import select
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from aggbox.collectives.group import Group, Member
from aggbox.errors import AggBoxError, CollectiveTimeout
from aggbox.protocol import (
    HEADER_SIZE,
    MAX_JOBS,
    MAX_MEMBERS,
    Flags,
    Header,
    MsgType,
    ip_to_u32,
    mac_bytes,
    max_payload,
)
from aggbox.sockets import udp_socket

DEFAULT_PORTS = (47000, 47999)


class BroadcastPrograms:
    """bpf/broadcast.c on this host: attached to ``ifname``, with one map slot per job.

    Create it once per host process (compiling takes about a second) and install as
    many jobs as needed (up to MAX_JOBS); close it to detach.
    """

    def __init__(self, ifname: str = "eth0", ports: tuple[int, int] = DEFAULT_PORTS,
                 xdp_mode: str = "auto", pin_tag: str = ""):
        from aggbox.bpf import ProgramFamily

        self.ifname = ifname
        self.family = ProgramFamily("broadcast", pin_tag=pin_tag)
        try:
            cfg = self.family["config"]
            value = cfg.Leaf()
            value.port_lo, value.port_hi = ports
            cfg[cfg.Key(0)] = value
            self.family.attach_tc(ifname, "tc_ingress", "ingress")
            self.family.attach_tc(ifname, "tc_egress", "egress")
        except BaseException:
            self.family.close()
            raise
        self._slots: dict[int, int] = {}
        self._xdp_mode_wanted = xdp_mode
        self.xdp_mode: str | None = None

    def enable_root(self) -> None:
        """Attach the ACK fold (XDP), needed only where a root runs: on a member's
        interface, native XDP would make the kernel copy every fanned-out clone."""
        if self.xdp_mode is None:
            self.xdp_mode = self.family.attach_xdp(self.ifname, "xdp_ingress",
                                                   self._xdp_mode_wanted)

    def install_job(self, group: Group) -> int:
        """Install (or re-install) ``group``'s job; its fold and window state start at zero."""
        if group.size > MAX_MEMBERS:
            raise AggBoxError(f"a group has at most {MAX_MEMBERS} members, got {group.size}")
        slot = self._slots.get(group.job_id)
        if slot is None:
            free = set(range(MAX_JOBS)) - set(self._slots.values())
            if not free:
                raise AggBoxError(f"at most {MAX_JOBS} broadcast jobs per host")
            slot = min(free)
        self._reset_slot(slot)
        self._write_members(slot, group.members)
        jobs = self.family["jobs"]
        job = jobs.Leaf()
        job.token, job.slot, job.n_members, job.my_rank = group.token, slot, group.size, group.rank
        job.group_ip = ip_to_u32(group.group_ip) if group.group_ip else 0
        jobs[jobs.Key(group.job_id)] = job
        self._slots[group.job_id] = slot
        return slot

    def remove_job(self, job_id: int) -> None:
        slot = self._slots.pop(job_id, None)
        self.family.discard("jobs", job_id)
        if slot is not None:
            self._reset_slot(slot)

    def _write_members(self, slot: int, members: tuple[Member, ...]) -> None:
        table = self.family["members"]
        for m in members:
            leaf = table.Leaf()
            leaf.ip = ip_to_u32(m.ip)
            ctypes.memmove(leaf.mac, mac_bytes(m.mac), 6)
            table[table.Key(slot * MAX_MEMBERS + m.rank)] = leaf

    def _reset_slot(self, slot: int) -> None:
        """Zero the job slot's ACK fold (root side) and receive windows (member side)."""
        fold = self.family["fold"]
        fold[fold.Key(slot)] = fold.Leaf()
        rx = self.family["rx"]
        for rank in range(MAX_MEMBERS):
            rx[rx.Key(slot * MAX_MEMBERS + rank)] = rx.Leaf()

    def received(self, job_id: int, rank: int) -> int:
        """Member side: the highest seq from ``rank`` up to which this host's kernel has
        acknowledged everything (its receive window's cumulative value)."""
        rx = self.family["rx"]
        return int(rx[rx.Key(self._slots[job_id] * MAX_MEMBERS + rank)].cum)

    def acked(self, job_id: int) -> list[int]:
        """Per member rank, the highest cumulative seq its kernel acknowledged to us."""
        fold = self.family["fold"]
        leaf = fold[fold.Key(self._slots[job_id])]
        return list(leaf.acked)

    def counters(self) -> dict[str, int]:
        return self.family.counters()

    def close(self) -> None:
        self.family.close()

    def __enter__(self) -> BroadcastPrograms:
        return self

    def __exit__(self, *exc) -> None:
        self.close()




@dataclass
class _Timers:
    """Retransmission timeout with exponential back-off."""

    initial_s: float = 0.005
    max_s: float = 0.2
    current_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.current_s = self.initial_s

    def backoff(self) -> None:
        self.current_s = min(self.current_s * 2, self.max_s)

    def reset(self) -> None:
        self.current_s = self.initial_s


class _Endpoint:
    """What the root's and a member's side share: a socket on the job's port and the
    host's programs, either owned (closed with us) or shared (only our job is removed)."""

    group: Group
    sock: socket.socket
    programs: BroadcastPrograms
    _own_programs: bool

    def close(self) -> None:
        self.sock.close()
        if self._own_programs:
            self.programs.close()
        else:
            self.programs.remove_job(self.group.job_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Broadcaster(_Endpoint):
    """The root's side: ``send(data)`` returns once every member's kernel has ``data``."""

    def __init__(self, group: Group, programs: BroadcastPrograms | None = None,
                 mtu: int = 1500, window: int = 32, retain: int = 8192):
        if group.rank != group.root:
            raise AggBoxError(f"rank {group.rank} is not the root ({group.root}) of the group")
        if not group.group_ip:
            raise AggBoxError("the group has no group_ip to send to (testbed.group_ips)")
        self.group = group
        self._own_programs = programs is None
        self.programs = programs or BroadcastPrograms(group.ifname)
        self.programs.enable_root()
        self.programs.install_job(group)
        self.sock = udp_socket(group.port)
        self.payload_max = max_payload(mtu)
        self.window = window
        self.retain = retain
        self.next_seq = 1
        self.msg_no = 0
        self.group_acked = 0
        self.sent: OrderedDict[int, bytes] = OrderedDict()  # seq -> packet, for resends
        self.timers = _Timers()
        # Per member: resends a NACK may still trigger, and when the budget was last
        # refilled. A NACK is 32 bytes: without a bound, one (spoofed) NACK could make the
        # root resend everything it retains.
        self._nack_budget = {m.rank: float(window) for m in group.receivers}
        self._nack_refill = {m.rank: time.monotonic() for m in group.receivers}
        self.stats = {"packets": 0, "retransmits": 0, "nacks": 0, "timeouts": 0,
                      "nacks_limited": 0}

    def send(self, data: bytes, timeout: float = 5.0) -> int:
        """Broadcast ``data`` to every member; return its last seq. Raises
        CollectiveTimeout naming the members that have not acknowledged by ``timeout``."""
        deadline = time.monotonic() + timeout
        chunks = [data[i:i + self.payload_max] for i in range(0, len(data), self.payload_max)]
        chunks = chunks or [b""]
        self.msg_no += 1
        for index, chunk in enumerate(chunks):
            while self.next_seq - self.group_acked > self.window:
                self._wait_acks(self.next_seq - self.window, deadline)
            flags = Flags.LAST_FRAG if index == len(chunks) - 1 else Flags.NONE
            self._send_new(chunk, index, flags)
        last = self.next_seq - 1
        self._wait_acks(last, deadline)
        return last

    def _send_new(self, chunk: bytes, index: int, flags: int) -> None:
        seq = self.next_seq
        self.next_seq += 1
        hdr = Header(type=MsgType.DATA, job_id=self.group.job_id, token=self.group.token,
                     seq=seq, round=index, rank=self.group.rank, count=len(chunk),
                     aux=self.msg_no, flags=int(flags))
        pkt = hdr.pack() + chunk
        self.sent[seq] = pkt
        while len(self.sent) > self.retain:
            self.sent.popitem(last=False)
        self.sock.sendto(pkt, (self.group.group_ip, self.group.port))
        self.stats["packets"] += 1

    def _wait_acks(self, target: int, deadline: float) -> None:
        """Read group-ACKs and NACKs until every member acknowledged ``target``."""
        self.timers.reset()
        while self.group_acked < target:
            now = time.monotonic()
            if now >= deadline:
                self._give_up(target)
            wait = min(self.timers.current_s, deadline - now)
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                self._drain()
            else:
                self.stats["timeouts"] += 1
                self._resend_missing(target)
                self.timers.backoff()

    def serve(self, duration: float) -> int:
        """Answer NACKs for ``duration`` seconds between sends; returns how many came.

        ``send`` returns when every member's KERNEL has the message; a member whose socket
        then dropped its tail NACKs it (see Receiver), and only a root that reads its
        socket can answer. Call this when there is nothing more to send (before closing)
        or between sparse messages."""
        deadline = time.monotonic() + duration
        before = self.stats["nacks"]
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                self._drain()
        return self.stats["nacks"] - before

    def _drain(self) -> None:
        while True:
            try:
                buf, addr = self.sock.recvfrom(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if len(buf) < HEADER_SIZE:
                continue
            hdr = Header.unpack(buf)
            if (not hdr.is_valid() or hdr.job_id != self.group.job_id
                    or hdr.token != self.group.token):
                continue
            if hdr.type == MsgType.GROUP_ACK:
                # The kernel never folds beyond what it fanned out; this is a second fence.
                self.group_acked = max(self.group_acked, min(hdr.aux, self.next_seq - 1))
            elif hdr.type == MsgType.NACK:
                self.stats["nacks"] += 1
                self._answer_nack(hdr)

    def _answer_nack(self, hdr: Header) -> None:
        """Resend what a NACK asks for, bounded: at most ``window`` packets per NACK and
        per member at most ``window`` packets per retransmission interval (a token bucket),
        only to the member's registered address (the kernel checked IP and MAC)."""
        rank = hdr.rank
        if rank not in self._nack_budget:
            return
        now = time.monotonic()
        rate = self.window / self.timers.initial_s  # packets per second
        budget = min(float(self.window),
                     self._nack_budget[rank] + (now - self._nack_refill[rank]) * rate)
        self._nack_refill[rank] = now
        first = hdr.aux
        last = min(hdr.aux + max(hdr.count, 1) - 1, self.next_seq - 1)
        allowed = min(last - first + 1, self.window, int(budget))
        if allowed < last - first + 1:
            self.stats["nacks_limited"] += 1
        self._nack_budget[rank] = budget - max(allowed, 0)
        if allowed > 0:
            self._resend(first, first + allowed - 1, self.group.members[rank].ip)

    def _resend_missing(self, target: int) -> None:
        """Resend to each member only what its kernel has not acknowledged (fold map)."""
        acked = self.programs.acked(self.group.job_id)
        for m in self.group.receivers:
            have = acked[m.rank]
            if have < target:
                self._resend(have + 1, min(target, have + self.window), m.ip)

    def _resend(self, first: int, last: int, ip: str) -> None:
        for seq in range(first, last + 1):
            pkt = self.sent.get(seq)
            if pkt is None:
                continue  # older than what we retain: cannot help (see `retain`)
            hdr = Header.unpack(pkt)
            hdr.flags |= Flags.RETRANSMIT
            self.sock.sendto(hdr.pack() + pkt[HEADER_SIZE:], (ip, self.group.port))
            self.stats["retransmits"] += 1

    def _give_up(self, target: int) -> None:
        acked = self.programs.acked(self.group.job_id)
        missing = [m for m in self.group.receivers if acked[m.rank] < target]
        names = ", ".join(f"rank {m.rank} ({m.ip}, has up to seq {acked[m.rank]})"
                          for m in missing)
        raise CollectiveTimeout(
            f"broadcast of seq {target} not acknowledged by {names}: "
            "is the member running and reachable?", [m.rank for m in missing])



class Receiver(_Endpoint):
    """A member's side: ``recv()`` returns the root's messages whole and in order."""

    NACK_INTERVAL_S = 0.002
    # While idle, how often to compare the kernel's ACKed seq with what the socket gave
    # us (backs off to the max while nothing is missing).
    TAIL_CHECK_S = (0.005, 0.2)

    def __init__(self, group: Group, programs: BroadcastPrograms | None = None):
        if group.rank == group.root:
            raise AggBoxError("the root does not receive its own broadcast")
        self.group = group
        self._own_programs = programs is None
        self.programs = programs or BroadcastPrograms(group.ifname)
        self.programs.install_job(group)
        self.sock = udp_socket(group.port)
        self.root = group.members[group.root]
        self.next_seq = 1
        self.pending: dict[int, tuple[Header, bytes]] = {}  # out-of-order packets by seq
        self.parts: list[bytes] = []  # fragments of the message being assembled
        self.ready: list[bytes] = []  # whole messages not yet returned
        self.last_nack = 0.0
        self._queued = False  # the socket may hold packets not yet read
        self._tail_wait = self.TAIL_CHECK_S[0]
        # No tail check before this time: a caller that polls (recv(timeout=0)) must not
        # pay a map lookup per call.
        self._tail_due = 0.0
        self.stats = {"duplicates": 0, "nacks": 0, "tail_nacks": 0}

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next message; blocks up to ``timeout`` (None: forever, 0: poll).
        Returns None when no whole message arrived in time."""
        # One readiness wait and one read per packet: a member's application cost per
        # message is what delivery latency and CPU per broadcast are made of (15 members
        # share a CPU on the testbed). Packets behind the message stay queued in the
        # socket for the next call, which finds them at once.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready:
            if self._queued and self._read_one():
                continue
            # Never block without a bound: the kernel ACKs at TC ingress, so a tail the
            # socket dropped shows no gap in seq; only the kernel's window tells.
            wait = self.NACK_INTERVAL_S * 5 if self.pending else self._tail_wait
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                self._queued = True
                continue
            if self.pending:
                self._nack_gap(force=True)
            elif time.monotonic() >= self._tail_due:
                self._check_tail()
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return self.ready.pop(0)

    def _read_one(self) -> bool:
        """Take one queued packet; False (and nothing queued) when the socket is empty."""
        try:
            self._take(*self.sock.recvfrom(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            self._queued = False
            return False
        return True

    def _take(self, buf: bytes, addr: tuple) -> None:
        if len(buf) < HEADER_SIZE:
            return
        hdr = Header.unpack(buf)
        if (not hdr.is_valid() or hdr.type != MsgType.DATA or hdr.job_id != self.group.job_id
                or hdr.token != self.group.token or hdr.rank != self.group.root):
            return
        if hdr.seq < self.next_seq or hdr.seq in self.pending:
            self.stats["duplicates"] += 1
            return
        self.pending[hdr.seq] = (hdr, buf[HEADER_SIZE:HEADER_SIZE + hdr.count])
        if self.next_seq in self.pending:
            # New data: the socket is being fed; check the tail soon after it stops.
            self._tail_wait = self.TAIL_CHECK_S[0]
            self._tail_due = time.monotonic() + self._tail_wait
        while self.next_seq in self.pending:
            h, payload = self.pending.pop(self.next_seq)
            self.next_seq += 1
            self.parts.append(payload)
            if h.flags & Flags.LAST_FRAG:
                self.ready.append(b"".join(self.parts))
                self.parts = []
        if self.pending:
            self._nack_gap()

    def _check_tail(self) -> None:
        """The socket is empty: did the kernel acknowledge seqs the socket never gave us
        (dropped after TC ingress: full buffer, checksum)? Then NACK them."""
        have = self.programs.received(self.group.job_id, self.group.root)
        if have < self.next_seq:
            self._tail_wait = min(self._tail_wait * 2, self.TAIL_CHECK_S[1])
            self._tail_due = time.monotonic() + self._tail_wait
            return
        self._tail_wait = self.TAIL_CHECK_S[0]
        self._tail_due = time.monotonic() + self._tail_wait
        self._send_nack(self.next_seq, min(have - self.next_seq + 1, 0xFFFF))
        self.stats["tail_nacks"] += 1

    def _send_nack(self, first: int, count: int) -> None:
        hdr = Header(type=MsgType.NACK, job_id=self.group.job_id, token=self.group.token,
                     seq=first + count, rank=self.group.rank, count=count, aux=first)
        self.sock.sendto(hdr.pack(), (self.root.ip, self.group.port))
        self.last_nack = time.monotonic()
        self.stats["nacks"] += 1

    def _nack_gap(self, force: bool = False) -> None:
        """Ask the root for what the socket lost although the kernel had acknowledged it."""
        now = time.monotonic()
        if not force and now - self.last_nack < self.NACK_INTERVAL_S:
            return
        self.last_nack = now
        first_pending = min(self.pending)
        count = min(first_pending - self.next_seq, 0xFFFF)
        if count <= 0:
            return
        hdr = Header(type=MsgType.NACK, job_id=self.group.job_id, token=self.group.token,
                     seq=first_pending, rank=self.group.rank, count=count, aux=self.next_seq)
        self.sock.sendto(hdr.pack(), (self.root.ip, self.group.port))
        self.stats["nacks"] += 1

