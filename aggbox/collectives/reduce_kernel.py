"""The kernel side of reduce-by-key: bpf/reduce.c on a reducer host.

:class:`ReduceByKeyPrograms` compiles, loads and attaches the program family (``kv_ingress``
on TC ingress, ``kv_walk`` in the tail-call array), installs and removes jobs in its maps,
reads the per-stream counts, the spill rings and the counters; :class:`KernelSums` reads
one job's sums from the ``entries`` array mapped into the process.

The mapper/reducer API that drives them (pairs, wire payloads, the endpoint,
``reduce_by_key``) is :mod:`aggbox.collectives.reduce`, which re-exports every name here.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import time

import numpy as np

from aggbox.collectives.group import Group
from aggbox.errors import AggBoxError
from aggbox.protocol import KV_KEY_WIDTH, MAX_MEMBERS, ip_to_u32, mac_bytes

DEFAULT_PORTS = (49000, 49999)
TC_PRIORITY = 3  # broadcast uses 1, aggregation 2
KEY_WIDTH = KV_KEY_WIDTH
MAP_ENTRIES = 131072  # KV_MAP_ENTRIES: distinct keys the kernel holds per job
CHUNK = 16  # KV_CHUNK: pairs one program of the tail-call chain adds
RING = 128  # 1 << KV_RING_SHIFT: the dedup ring per mapper, the largest window
MAX_JOBS = 4  # KV_MAX_JOBS: concurrent jobs per host (a returned one lingers 1 s)

_DIR_KEY_DTYPE = np.dtype([("slot", "<u4"), ("pad", "<u4"), ("key", f"S{KEY_WIDTH}")])
# struct kv_entry in bpf/reduce.c: what the reducer's process sees through mmap
ENTRY_DTYPE = np.dtype([("key", f"S{KEY_WIDTH}"), ("value", "<i8"), ("state", "<u8")])
ENTRY_FREE, ENTRY_VALID, ENTRY_WASTED = 0, 1, 2
_STATE_SPILLED = 3  # enum kv_state in bpf/reduce.c


class ReduceByKeyPrograms:
    """bpf/reduce.c on a reducer host: ``kv_ingress`` on TC ingress (priority 3) and
    ``kv_walk`` in the tail-call array. Create it inside the host's network namespace,
    once per process (compiling takes a second or more); install a job per reduction.

    The kernel's ``entries`` array is mapped into this process (BPF_F_MMAPABLE): a job's
    sums are read from memory, not through map syscalls (see :class:`KernelSums`)."""

    def __init__(self, ifname: str = "eth0", ports: tuple[int, int] = DEFAULT_PORTS,
                 map_entries: int = MAP_ENTRIES, chunk: int = CHUNK, pin_tag: str = ""):
        from aggbox.bpf import ProgramFamily

        if map_entries < 1 or map_entries % 128:
            raise AggBoxError(f"map_entries must be a positive multiple of 128 (whole pages "
                              f"of entries), got {map_entries}")
        self.ifname = ifname
        self.map_entries = map_entries
        self.chunk = chunk
        self.family = ProgramFamily(
            "reduce", defines={"KV_MAP_ENTRIES": map_entries, "KV_CHUNK": chunk,
                               "KV_MAX_JOBS": MAX_JOBS}, pin_tag=pin_tag)
        self._mmap = None
        try:
            cfg = self.family["config"]
            value = cfg.Leaf()
            value.port_lo, value.port_hi = ports
            cfg[cfg.Key(0)] = value
            walk = self.family.load("kv_walk", self.family._BPF.SCHED_CLS)
            chain = self.family["kv_chain"]
            chain[ctypes.c_int(0)] = ctypes.c_int(walk.fd)
            self._mmap = mmap.mmap(self.family["entries"].map_fd,
                                   MAX_JOBS * map_entries * ENTRY_DTYPE.itemsize,
                                   mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.entries = np.frombuffer(self._mmap, dtype=ENTRY_DTYPE)
            self.family.attach_tc(ifname, "kv_ingress", "ingress", prio=TC_PRIORITY)
        except BaseException:
            self._unmap()
            self.family.close()
            raise
        self._slots: dict[int, int] = {}
        self._lingering: list[int] = []  # jobs whose sums were read, oldest first
        self._keys_cleared: set[int] = set()
        self._lock = threading.Lock()  # lingering endpoints remove jobs from a thread
        self._seen_fd = self.family["seen"].map_fd
        self._alloc_fd = self.family["alloc"].map_fd
        self._streams_fd = self.family["streams"].map_fd

    # -- jobs -------------------------------------------------------------------------

    def install_job(self, group: Group) -> int:
        """Install ``group``'s job with this host's rank; its state starts empty."""
        if group.size > MAX_MEMBERS:
            raise AggBoxError(f"a group has at most {MAX_MEMBERS} members, got {group.size}")
        with self._lock:
            slot = self._slots.get(group.job_id)
            if slot is None:
                free = sorted(set(range(MAX_JOBS)) - set(self._slots.values()))
                if not free and self._lingering:  # the oldest finished job gives way
                    self._remove(self._lingering.pop(0))
                    free = sorted(set(range(MAX_JOBS)) - set(self._slots.values()))
                if not free:
                    raise AggBoxError(f"at most {MAX_JOBS} reduce-by-key jobs per host at once")
                slot = free[0]
            self._reset_slot(slot, group.size)
            members = self.family["members"]
            for m in group.members:
                leaf = members.Leaf()
                leaf.ip = ip_to_u32(m.ip)
                # The kernel refuses the member's IP from any other MAC (zero: unchecked).
                ctypes.memmove(leaf.mac, mac_bytes(m.mac), 6)
                members[members.Key(slot * MAX_MEMBERS + m.rank)] = leaf
            jobs = self.family["jobs"]
            job = jobs.Leaf()
            job.token, job.slot, job.n_members, job.my_rank = (group.token, slot, group.size,
                                                                group.rank)
            jobs[jobs.Key(group.job_id)] = job
            self._slots[group.job_id] = slot
        return slot

    def remove_job(self, job_id: int) -> None:
        with self._lock:
            self._remove(job_id)

    def _remove(self, job_id: int) -> None:
        slot = self._slots.pop(job_id, None)
        if job_id in self._lingering:
            self._lingering.remove(job_id)
        self.family.discard("jobs", job_id)
        if slot is not None:
            self._clear_keys(slot)

    def finish_job(self, job_id: int) -> None:
        """The job's sums were read: its keys leave the kernel's directory now (nothing is
        added any more: the dedup ring answers resent packets), and its slot may be taken
        over by a new job, the oldest finished first, while it still answers DONEs."""
        with self._lock:
            slot = self._slots.get(job_id)
            if slot is None:
                return
            self._clear_keys(slot)
            if job_id not in self._lingering:
                self._lingering.append(job_id)

    def _reset_slot(self, slot: int, n_members: int) -> None:
        """Empty the slot: dedup rings (of ranks 0..n_members-1), key directory, entries."""
        seen = self.family["seen"]
        n = n_members * RING
        keys = (seen.Key * n)()
        for i in range(n):
            keys[i] = slot * MAX_MEMBERS * RING + i
        seen.items_update_batch(keys, (seen.Leaf * n)())
        streams = self.family["streams"]
        keys = (streams.Key * n_members)()
        for i in range(n_members):
            keys[i] = slot * MAX_MEMBERS + i
        streams.items_update_batch(keys, (streams.Leaf * n_members)())
        self._clear_keys(slot)
        self._keys_cleared.discard(slot)
        self.region(slot).view(np.uint8)[:] = 0
        alloc = self.family["alloc"]
        alloc[alloc.Key(slot)] = alloc.Leaf(0)

    def _clear_keys(self, slot: int) -> None:
        """Delete the slot's keys from the key directory (the keys its VALID entries hold:
        every directory entry of the slot points to one). Once per job."""
        if slot in self._keys_cleared:
            return
        self._keys_cleared.add(slot)
        region = self.region(slot)[:self.allocated(slot)]
        valid = region[region["state"] == ENTRY_VALID]
        if not len(valid):
            return
        from bcc import libbcc

        keys = np.zeros(len(valid), dtype=_DIR_KEY_DTYPE)
        keys["slot"] = slot
        keys["key"] = valid["key"]
        count = ctypes.c_uint32(len(keys))
        libbcc.lib.bpf_delete_batch(self.family["keydir"].map_fd,
                                    ctypes.c_void_p(keys.ctypes.data), ctypes.byref(count))

    # -- reading ----------------------------------------------------------------------

    def slot_of(self, job_id: int) -> int:
        return self._slots[job_id]

    def region(self, slot: int) -> np.ndarray:
        """The slot's entries, in this process's memory (a live view of the kernel's)."""
        return self.entries[slot * self.map_entries:(slot + 1) * self.map_entries]

    def allocated(self, slot: int) -> int:
        """Entries the slot has handed out (some may still be being written)."""
        from bcc import libbcc

        key, value = ctypes.c_uint32(slot), ctypes.c_uint64(0)
        libbcc.lib.bpf_lookup_elem(self._alloc_fd, ctypes.byref(key), ctypes.byref(value))
        return min(value.value, self.map_entries)

    def stream_counts(self, slot: int, rank: int) -> tuple[int, int]:
        """(packets taken whole, packets spilled) from sender ``rank``, each seq once."""
        from bcc import libbcc

        key, value = ctypes.c_uint32(slot * MAX_MEMBERS + rank), (ctypes.c_uint64 * 2)()
        libbcc.lib.bpf_lookup_elem(self._streams_fd, ctypes.byref(key), ctypes.byref(value))
        return value[0], value[1]

    def spill_bits(self, job_id: int, rank: int, seq: int) -> int | None:
        """For a spilled packet (rank, seq): bit i set = pair i is the application's to
        merge. None when the ring holds no spill for it."""
        slot = self._slots.get(job_id)
        if slot is None or not 0 <= rank < MAX_MEMBERS:
            return None
        key = ctypes.c_uint32((slot * MAX_MEMBERS + rank) * RING + (seq % RING))
        value = (ctypes.c_uint64 * 2)()
        from bcc import libbcc

        if libbcc.lib.bpf_lookup_elem(self._seen_fd, ctypes.byref(key), ctypes.byref(value)):
            return None
        tag, spill = value[0], value[1]
        if tag >> 8 != seq or tag & 0xFF != _STATE_SPILLED:
            return None
        return spill

    def counters(self) -> dict[str, int]:
        return self.family.counters()

    def _unmap(self) -> None:
        self.entries = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a KernelSums view is still alive: the GC will unmap
                pass
            self._mmap = None

    def close(self) -> None:
        self._unmap()
        self.family.close()

    def __enter__(self) -> ReduceByKeyPrograms:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KernelSums:
    """A reducer's view of its job's sums in the kernel's ``entries`` array.

    :meth:`learn` turns newly published entries into a ``{key: entry number}`` directory;
    the reducer calls it while it waits for the mappers, so that at the end only the sums
    are left to read: :meth:`snapshot` copies them (one memcpy) once every mapper is done.
    """

    def __init__(self, programs: ReduceByKeyPrograms, job_id: int):
        self.programs = programs
        self.slot = programs.slot_of(job_id)
        self.region = programs.region(self.slot)
        self.directory: dict[bytes, int] = {}
        self.learned = 0  # entries below this were looked at

    def learn(self) -> int:
        """Take in the entries published since the last call; returns how many remain
        allocated but not yet published (being written right now)."""
        n = self.programs.allocated(self.slot)
        if n <= self.learned:
            return 0
        states = self.region["state"][self.learned:n]
        pending = np.flatnonzero(states == ENTRY_FREE)
        stop = self.learned + (int(pending[0]) if len(pending) else n - self.learned)
        if stop > self.learned:
            seg = self.region[self.learned:stop]
            valid = np.flatnonzero(seg["state"] == ENTRY_VALID)
            keys = seg["key"][valid].tolist()  # S16 drops the zero padding: exact
            self.directory.update(zip(keys, (valid + self.learned).tolist(), strict=True))
            self.learned = stop
        return n - stop

    def snapshot(self, settle_s: float = 0.05) -> np.ndarray:
        """The sums of every entry learned (index = entry number). Call once nothing more
        can be added (every mapper is done); waits up to ``settle_s`` for entries that a
        CPU is still publishing."""
        end = time.monotonic() + settle_s
        while self.learn() and time.monotonic() < end:
            time.sleep(0.0005)
        return self.region["value"][:self.learned].copy()
