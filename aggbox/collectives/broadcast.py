"""In-kernel broadcast with a stateless group acknowledgment.

The root application makes ONE ``sendto`` per packet, to the group's virtual address;
bpf/broadcast.c copies it to every member in the root's kernel, each member's kernel
answers with a cumulative ACK without waking its application, and the root's XDP folds
those ACKs so that its application receives ONE group-ACK when every member has the
packet. See bpf/broadcast.c for exactly what an ACK promises.

Reliability, in layers:
- lost DATA or ACK: the root times out, reads the per-member cumulative ACKs from the
  ``fold`` map and resends only to the members that lack packets (unicast). The timeout
  comes from the measured round trip (send of a packet to its group-ACK; SRTT + 4 RTTVAR,
  clamped, see aggbox/collectives/rtt.py) and runs from the last progress: packets that
  arrive meanwhile (another member's NACKs) do not postpone it;
- a member whose socket dropped a packet the kernel had acknowledged (checksum, full
  buffer) sees the gap in ``seq`` and sends a NACK; the root keeps recent packets for it;
- duplicates are dropped by the receiver (by seq); a member that never answers ends
  ``send`` with :class:`CollectiveTimeout` naming it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import select
import socket
import threading
import time
from collections import OrderedDict

from aggbox.collectives.group import Group, Member
from aggbox.collectives.rtt import RetransmitTimer
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
from aggbox.sockets import start_linger, udp_socket, udp_socket_taking_over

DEFAULT_PORTS = (47000, 47999)
# A member that has read its last message keeps its job (and socket) this long after
# close(): its kernel must ACK the root's resends of a tail whose ACK was lost, or the
# root's send() would wait for a member that already left (20% loss: ~20 resend rounds).
LINGER_S = 1.0


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
        # Receivers and Broadcasters of several jobs install from their own threads: a
        # slot is chosen and claimed under one lock, or two jobs share one fold.
        self._lock = threading.Lock()
        self._xdp_mode_wanted = xdp_mode
        self.xdp_mode: str | None = None
        self.lingering: list[threading.Thread] = []  # closed receivers still ACKing

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
        with self._lock:
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
            job.token, job.slot = group.token, slot
            job.n_members, job.my_rank = group.size, group.rank
            job.group_ip = ip_to_u32(group.group_ip) if group.group_ip else 0
            jobs[jobs.Key(group.job_id)] = job
            self._slots[group.job_id] = slot
            return slot

    def remove_job(self, job_id: int) -> None:
        with self._lock:
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
        end = time.monotonic() + LINGER_S + 1.0
        while self.lingering:  # their jobs go before the programs do
            self.lingering.pop().join(max(0.0, end - time.monotonic()))
        self.family.close()

    def __enter__(self) -> BroadcastPrograms:
        return self

    def __exit__(self, *exc) -> None:
        self.close()




_lingering: list[threading.Thread] = []


@atexit.register
def wait_lingering(timeout: float = LINGER_S + 1.0) -> None:
    """Wait for closed receivers that still acknowledge (at exit too: a receiver that
    owns its programs detaches them when its linger ends)."""
    end = time.monotonic() + timeout
    while _lingering:
        _lingering.pop().join(max(0.0, end - time.monotonic()))


class _Endpoint:
    """What the root's and a member's side share: a socket on the job's port and the
    host's programs, either owned (closed with us) or shared (only our job is removed)."""

    group: Group
    sock: socket.socket
    programs: BroadcastPrograms
    _own_programs: bool

    def fileno(self) -> int:
        """The socket's: an endpoint can be waited on with select()."""
        return self.sock.fileno()

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

    # A member's NACK budget (``window`` packets) refills over this time: fixed, since it
    # bounds what a forged NACK may cost, whatever the RTT estimate says.
    NACK_REFILL_S = 0.005

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
        self.timer = RetransmitTimer()
        # RTT samples: when each not yet group-acknowledged seq was first sent, and the
        # seqs sent more than once (Karn's rule: an ACK after a resend is no sample).
        self._sent_at: dict[int, float] = {}
        self._resent: set[int] = set()
        self._acked_seen: dict[int, int] = {}  # per member: its fold value at the last round
        self._round_at: float | None = None  # when the last resend round went out
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
        self.stats.update(self.timer.as_dict())
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
        self._sent_at[seq] = time.monotonic()
        self.sock.sendto(pkt, (self.group.group_ip, self.group.port))
        self.stats["packets"] += 1

    def _wait_acks(self, target: int, deadline: float) -> None:
        """Read group-ACKs and NACKs until every member acknowledged ``target``.

        The resend timer runs from the last progress of the group-ACK, not from the last
        packet read: NACKs from other members arriving faster than the timeout must not
        postpone the resend a silent member needs (at 20% loss they did, until send()
        timed out naming a member two packets behind)."""
        self.timer.progress()
        resend_at = time.monotonic() + self.timer.current_s
        while self.group_acked < target:
            now = time.monotonic()
            if now >= deadline:
                self._sync_fold()
                if self.group_acked >= target:
                    return
                self._give_up(target)
            if now >= resend_at:
                self.stats["timeouts"] += 1
                moved = self._resend_missing(target)
                self._round_at = time.monotonic()
                if not moved:
                    self.timer.expired()  # nobody moved since the last round: back off
                resend_at = now + self.timer.current_s
                continue
            ready, _, _ = select.select([self.sock], [], [], min(resend_at, deadline) - now)
            if ready:
                before = self.group_acked
                self._drain()
                if self.group_acked > before:
                    self.timer.progress()
                    resend_at = time.monotonic() + self.timer.current_s

    def _group_acked_to(self, value: int) -> None:
        """Take a group-ACK (never beyond what we sent) and learn the RTT from it."""
        value = min(value, self.next_seq - 1)
        if value <= self.group_acked:
            return
        old, self.group_acked = self.group_acked, value
        sent_at = self._sent_at.get(value)
        now = time.monotonic()
        if sent_at is not None and not any(s in self._resent for s in range(old + 1, value + 1)):
            self.timer.sample(now - sent_at)
        elif self._round_at is not None:
            # Under heavy loss nearly every message has a resend (at 20% per link and 7
            # members, none was clean in 150), so Karn's rule alone left the initial RTO
            # in place for good. The first rise after a resend round, whose originals had
            # already timed out, is taken as that round's trip; were an original merely
            # late, this underestimates, which the RTO's floor bounds.
            self.timer.sample(now - self._round_at)
        self._round_at = None
        for seq in range(old + 1, value + 1):
            self._sent_at.pop(seq, None)
            self._resent.discard(seq)

    def _sync_fold(self) -> None:
        """The group value from the fold map itself: a group-ACK the socket never
        delivered must not leave the root resending nothing until its deadline."""
        acked = self.programs.acked(self.group.job_id)
        self._group_acked_to(min(acked[m.rank] for m in self.group.receivers))

    def serve(self, duration: float) -> int:
        """Answer NACKs for ``duration`` seconds between sends; returns how many came.

        ``send`` returns when every member's KERNEL has the message; a member whose socket
        then dropped its tail NACKs it (see Receiver), and only a root that reads its
        socket can answer. Call this when there is nothing more to send (before closing)
        or between sparse messages."""
        deadline = time.monotonic() + duration
        before = self.stats["nacks"]
        self._drain()  # at least once: serve(0) answers what is queued
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
                self._group_acked_to(hdr.aux)
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
        rate = self.window / self.NACK_REFILL_S  # packets per second
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

    def _resend_missing(self, target: int) -> bool:
        """Resend to each member only what its kernel has not acknowledged (fold map).
        True if some member's kernel acknowledged more since the last round: the path is
        alive and losing packets at random, so the timer does not back off (backing off
        under 20% random loss took a message through 1 + 2 + 4 + 8 ms of timeouts)."""
        acked = self.programs.acked(self.group.job_id)
        self._group_acked_to(min(acked[m.rank] for m in self.group.receivers))
        moved = any(acked[m.rank] > self._acked_seen.get(m.rank, 0)
                    for m in self.group.receivers)
        self._acked_seen = {m.rank: acked[m.rank] for m in self.group.receivers}
        for m in self.group.receivers:
            have = acked[m.rank]
            if have < target:
                self._resend(have + 1, min(target, have + self.window), m.ip)
        return moved

    def _resend(self, first: int, last: int, ip: str) -> None:
        for seq in range(first, last + 1):
            pkt = self.sent.get(seq)
            if pkt is None:
                continue  # older than what we retain: cannot help (see `retain`)
            hdr = Header.unpack(pkt)
            hdr.flags |= Flags.RETRANSMIT
            self.sock.sendto(hdr.pack() + pkt[HEADER_SIZE:], (ip, self.group.port))
            self._resent.add(seq)
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

    # While idle, how often at most to compare the kernel's ACKed seq with what the
    # socket gave us: the check starts one RTO after data stops and backs off to this
    # while nothing is missing (a poll, not a retransmission timer).
    TAIL_CHECK_MAX_S = 0.2

    def __init__(self, group: Group, programs: BroadcastPrograms | None = None):
        if group.rank == group.root:
            raise AggBoxError("the root does not receive its own broadcast")
        self.group = group
        self._own_programs = programs is None
        self.programs = programs or BroadcastPrograms(group.ifname)
        # The port first: a receiver of an ended job lingering on it lets go of it, and of
        # its kernel job, before this job (perhaps with the same id) is installed.
        self.sock = udp_socket_taking_over(group.port, LINGER_S + 1.0)
        self.programs.install_job(group)
        self.root = group.members[group.root]
        self.next_seq = 1
        self.pending: dict[int, tuple[Header, bytes]] = {}  # out-of-order packets by seq
        self.parts: list[bytes] = []  # fragments of the message being assembled
        self.ready: list[bytes] = []  # whole messages not yet returned
        self.last_nack = 0.0
        # Re-NACK and tail-check timing from the measured NACK-to-repair time.
        self.timer = RetransmitTimer()
        self._nack_first = 0  # first seq of the gap last NACKed (0: none outstanding)
        self._nack_at = 0.0
        self._nack_repeats = 0
        self._queued = False  # the socket may hold packets not yet read
        self._tail_wait = self.timer.rto_s
        # No tail check before this time: a caller that polls (recv(timeout=0)) must not
        # pay a map lookup per call.
        self._tail_due = 0.0
        self.stats = {"duplicates": 0, "nacks": 0, "tail_nacks": 0}
        self._closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, linger: bool = True) -> None:
        """Leave the job. With ``linger`` (default) the job stays installed for LINGER_S
        in a daemon thread, the socket drained, so that the root's resends of packets
        whose ACK was lost are still acknowledged; closing the programs (or the process
        ending) waits for it."""
        if self._closed:
            return
        self._closed = True
        if not linger:
            super().close()
            return
        thread = start_linger(self.group.port, self.sock, LINGER_S, self._discard,
                              lambda: _Endpoint.close(self))
        self.programs.lingering.append(thread)
        _lingering.append(thread)

    def _discard(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.sock.recv(65536, socket.MSG_DONTWAIT)

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
            wait = self.timer.current_s if self.pending else self._tail_wait
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                self._queued = True
                continue
            if self.pending:
                self.timer.expired()  # the last NACK (or its answer) was lost: back off
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
            self._tail_wait = self.timer.rto_s
            self._tail_due = time.monotonic() + self._tail_wait
        while self.next_seq in self.pending:
            h, payload = self.pending.pop(self.next_seq)
            self.next_seq += 1
            self.parts.append(payload)
            if h.flags & Flags.LAST_FRAG:
                self.ready.append(b"".join(self.parts))
                self.parts = []
        if self._nack_first and self.next_seq > self._nack_first:
            self._repaired()
        if self.pending:
            self._nack_gap()

    def _repaired(self) -> None:
        """The gap last NACKed is filled: an RTT sample if it was NACKed once (Karn)."""
        if self._nack_repeats == 0:
            self.timer.sample(time.monotonic() - self._nack_at)
        self.timer.progress()
        self._nack_first = 0

    def _check_tail(self) -> None:
        """The socket is empty: did the kernel acknowledge seqs the socket never gave us
        (dropped after TC ingress: full buffer, checksum)? Then NACK them."""
        have = self.programs.received(self.group.job_id, self.group.root)
        if have < self.next_seq:
            self._tail_wait = min(self._tail_wait * 2, self.TAIL_CHECK_MAX_S)
            self._tail_due = time.monotonic() + self._tail_wait
            return
        self._tail_wait = self.timer.current_s
        self._tail_due = time.monotonic() + self._tail_wait
        self._send_nack(self.next_seq, min(have - self.next_seq + 1, 0xFFFF))
        self.stats["tail_nacks"] += 1

    def _send_nack(self, first: int, count: int) -> None:
        hdr = Header(type=MsgType.NACK, job_id=self.group.job_id, token=self.group.token,
                     seq=first + count, rank=self.group.rank, count=count, aux=first)
        self.sock.sendto(hdr.pack(), (self.root.ip, self.group.port))
        self._nacked(first)
        self.stats["nacks"] += 1

    def _nacked(self, first: int) -> None:
        now = self.last_nack = time.monotonic()
        if first == self._nack_first:
            self._nack_repeats += 1
        else:
            self._nack_first, self._nack_at, self._nack_repeats = first, now, 0

    def _nack_gap(self, force: bool = False) -> None:
        """Ask the root for what the socket lost although the kernel had acknowledged it."""
        now = time.monotonic()
        # At most one NACK per RTO: the root needs a round trip to answer the last one.
        if not force and now - self.last_nack < self.timer.rto_s:
            return
        first_pending = min(self.pending)
        count = min(first_pending - self.next_seq, 0xFFFF)
        if count <= 0:
            return
        self._send_nack(self.next_seq, count)

