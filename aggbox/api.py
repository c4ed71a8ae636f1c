"""AggBox from one's own program, with no hand-built groups.

    import aggbox

    with aggbox.init(rank, world, rendezvous="tcp://10.0.0.1:29400") as ctx:
        data = ctx.broadcast(b"hello" if ctx.rank == 0 else None)   # every rank: b"hello"
        if ctx.rank != ctx.aggregator_rank:
            total = ctx.allreduce(np.ones(1000, np.float32))      # sum over the workers
        counts = ctx.reduce_by_key(Counter(w.encode() for w in words))  # my keys' sums

How a job is agreed (every call of :func:`init` runs the same steps):

1. rank 0 serves a tiny key-value store on the rendezvous address (a TCP port); every rank
   connects to it;
2. every rank finds the interface that routes to the rendezvous address (or ``iface``)
   and publishes its IPv4 address, MAC and MTU under its rank (a second process with the
   same rank is refused);
3. rank 0 waits for every rank, draws the job id, the token and the port offset with
   :mod:`secrets`, picks the broadcast group address, and publishes the job;
4. every rank installs on its own host what belongs there: bpf/broadcast.c (every rank),
   bpf/reduce.c (every rank: any rank may reduce), bpf/aggregate.c (the aggregator rank
   only) and says so; a rank that cannot (not root, no BPF) says why, and every other rank
   fails with that rank's reason instead of waiting.

The operations map onto :mod:`aggbox.collectives` (nothing is reimplemented here):
:meth:`Context.broadcast` / :meth:`Context.broadcaster` onto ``Broadcaster`` and
``Receiver``, :meth:`Context.allreduce` onto ``Allreducer`` (the workers are every rank
but the aggregator, whose kernel does the sum), :meth:`Context.reduce_by_key` onto
``ReduceByKey`` (one job per call). :meth:`Context.close` (or leaving the ``with`` block)
waits for every rank, then removes everything this rank installed. docs/api.md is the
user's guide.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np

from aggbox import auth
from aggbox.collectives.group import Group, Member
from aggbox.errors import AggBoxError, CollectiveTimeout, SetupError
from aggbox.protocol import MAX_MEMBERS

__all__ = ["Context", "OPERATIONS", "init", "interface_address", "interface_mtu",
           "interface_to", "parse_rendezvous"]

#: What :func:`init` can set up; ``operations=`` narrows it (fewer programs to compile).
OPERATIONS = ("broadcast", "allreduce", "reduce_by_key")
SIOCGIFADDR, SIOCGIFNETMASK, SIOCGIFHWADDR, SIOCGIFMTU = 0x8915, 0x891B, 0x8927, 0x8921
GROUP_MAC = Group.group_mac  # the MAC the broadcast group address resolves to
NUD_INCOMPLETE, NUD_FAILED, NUD_PERMANENT = 0x01, 0x20, 0x80
# Job ids of one context: base + 0 the allreduce, base + 1 + root a broadcast channel,
# base + REDUCE_JOBS + k the k-th reduce_by_key call (the kernel keeps jobs apart by id).
REDUCE_JOBS = 1024
JOB_SPAN = 1 << 20
PORT_BASES = {"broadcast": 47000, "allreduce": 48000, "reduce_by_key": 49000}
PORT_SPAN = 1000  # each family's programs look at their 1000 ports only
MAX_LINE = 1 << 20  # a store request or answer, in bytes
ENV_PORT = "AGGBOX_MASTER_PORT"  # env://: overrides MASTER_PORT (torch's store has it)


# ----------------------------------------------------------------- interfaces ----------


def _ioctl(sock: socket.socket, request: int, ifname: str) -> bytes:
    return fcntl.ioctl(sock.fileno(), request, struct.pack("256s", ifname.encode()[:15]))


def interface_address(ifname: str) -> tuple[str, str, int]:
    """``(ipv4, mac, prefix length)`` of ``ifname`` in this network namespace (ioctls,
    which answer for the caller's namespace: /sys may show another's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            hw = _ioctl(s, SIOCGIFHWADDR, ifname)[18:24]
        except OSError:
            names = ", ".join(name for _, name in socket.if_nameindex())
            raise AggBoxError(f"interface {ifname!r} not found (this host has: {names})"
                              ) from None
        try:
            ip = socket.inet_ntoa(_ioctl(s, SIOCGIFADDR, ifname)[20:24])
            mask = socket.inet_ntoa(_ioctl(s, SIOCGIFNETMASK, ifname)[20:24])
        except OSError:
            raise AggBoxError(f"interface {ifname!r} has no IPv4 address") from None
    mac = ":".join(f"{b:02x}" for b in hw)
    if mac == "00:00:00:00:00:00":
        raise AggBoxError(f"interface {ifname!r} has no Ethernet address (loopback or a "
                          "tunnel?): AggBox needs the hosts' shared L2 link; pass iface=")
    return ip, mac, ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen


def interface_mtu(ifname: str) -> int:
    """The MTU of ``ifname`` in this network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16si", ifname.encode()[:15], 0)
        return struct.unpack("16si", fcntl.ioctl(s.fileno(), SIOCGIFMTU, req))[1]


def interface_to(ip: str) -> tuple[str, str, str]:
    """``(ifname, own ip, own mac)`` of the interface this host reaches ``ip`` through.

    The route is the kernel's (connecting a UDP socket sends nothing); the interface is
    the one holding the source address the route picks (for this host's own address:
    the interface that holds it, not loopback)."""
    if ipaddress.IPv4Address(ip).is_loopback:
        raise AggBoxError(f"{ip} is a loopback address: AggBox needs the hosts' shared "
                          "L2 link; use an address on it, or pass iface=")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
        except OSError as exc:
            raise AggBoxError(f"no route to {ip}: {exc}; check the address") from exc
        own = s.getsockname()[0]
    for _, name in socket.if_nameindex():
        with contextlib.suppress(AggBoxError):
            addr, mac, _ = interface_address(name)
            if addr == own:
                return name, own, mac
    raise AggBoxError(f"no Ethernet interface holds {own}, the address that routes to "
                      f"{ip}; pass iface=")


# ----------------------------------------------------------------- the store -----------


class _Store:
    """The keys and a condition to wait on (the server's state)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.cond = threading.Condition()

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        with self.cond:
            if op == "set":
                key = str(req["key"])
                if req.get("exclusive") and key in self.data:
                    return {"ok": False, "error": f"{key} is already set"}
                self.data[key] = str(req["value"])
                self.cond.notify_all()
                return {"ok": True}
            if op == "wait":
                return self._wait(list(req["keys"]), float(req["timeout"]),
                                  str(req.get("abort_prefix", "")))
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _wait(self, keys: list[str], timeout: float, abort: str) -> dict:
        """Block until every key is set, a key under ``abort`` is, or ``timeout``."""
        deadline = time.monotonic() + min(timeout, 3600.0)
        while True:
            failed = {k: v for k, v in self.data.items() if abort and k.startswith(abort)}
            missing = [k for k in keys if k not in self.data]
            left = deadline - time.monotonic()
            if failed or not missing or left <= 0:
                return {"ok": True, "values": {k: self.data[k] for k in keys
                                               if k in self.data},
                        "missing": missing, "failed": failed}
            self.cond.wait(left)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        store: _Store = self.server.store  # type: ignore[attr-defined]
        for line in iter(lambda: self.rfile.readline(MAX_LINE), b""):
            try:
                answer = store.handle(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            self.wfile.write(json.dumps(answer).encode() + b"\n")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True  # a job restarted at once finds its port in TIME_WAIT


class StoreClient:
    """A connection to the rendezvous store (rank 0's :class:`_Server`)."""

    def __init__(self, host: str, port: int, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5.0)
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise AggBoxError(
                        f"rendezvous timeout: no store at tcp://{host}:{port} after "
                        f"{timeout:g} s ({exc.strerror or exc}): is rank 0 running, on "
                        "that address?") from None
                time.sleep(0.2)
        self.sock.settimeout(None)
        self.file = self.sock.makefile("rwb")
        self.where = f"tcp://{host}:{port}"
        self._lock = threading.Lock()

    def _ask(self, req: dict) -> dict:
        with self._lock:
            try:
                self.file.write(json.dumps(req).encode() + b"\n")
                self.file.flush()
                line = self.file.readline(MAX_LINE)
            except OSError as exc:
                line, why = b"", str(exc)
            else:
                why = "closed"
        if not line:
            raise AggBoxError(f"the rendezvous store {self.where} is gone ({why}): did "
                              "rank 0 exit? (see its output)")
        return json.loads(line)

    def set(self, key: str, value: str, exclusive: bool = False) -> bool:
        """Set ``key``; with ``exclusive``, False (nothing changed) if it was set."""
        return bool(self._ask({"op": "set", "key": key, "value": value,
                               "exclusive": exclusive})["ok"])

    def wait(self, keys: Sequence[str], timeout: float, abort_prefix: str = "failed/"
             ) -> dict:
        """``{"values", "missing", "failed"}`` once every key is set, a key under
        ``abort_prefix`` is, or ``timeout`` seconds passed."""
        return self._ask({"op": "wait", "keys": list(keys), "timeout": timeout,
                          "abort_prefix": abort_prefix})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def serve_store(host: str, port: int) -> _Server:
    """Rank 0: serve the store on ``host:port`` from a daemon thread."""
    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        if exc.errno == 99:  # EADDRNOTAVAIL
            raise AggBoxError(f"rank 0 must run on the rendezvous host: {host} is not an "
                              "address of this host") from None
        raise AggBoxError(f"rank 0 cannot serve the rendezvous store on {host}:{port}: "
                          f"{exc.strerror or exc} (another job, or torch's store, on that "
                          f"port? pick another; env:// reads {ENV_PORT})") from None
    server.store = _Store()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="aggbox-store", daemon=True).start()
    return server


def parse_rendezvous(rendezvous: str, rank: int | None, world: int | None
                     ) -> tuple[str, int, int, int]:
    """``(host ip, port, rank, world)`` from ``tcp://host:port`` or ``env://`` (torch's
    MASTER_ADDR, MASTER_PORT (``AGGBOX_MASTER_PORT`` first), RANK, WORLD_SIZE)."""
    url = urlparse(rendezvous)
    if url.scheme == "env":
        env = os.environ
        try:
            host, port = env["MASTER_ADDR"], int(env.get(ENV_PORT) or env["MASTER_PORT"])
            rank = int(env["RANK"]) if rank is None else rank
            world = int(env["WORLD_SIZE"]) if world is None else world
        except KeyError as exc:
            raise AggBoxError(f"env:// needs the environment variable {exc.args[0]}") from None
        except ValueError as exc:
            raise AggBoxError(f"env://: {exc}") from None
    elif url.scheme == "tcp":
        if not url.hostname or url.port is None:
            raise AggBoxError(f"rendezvous must be tcp://host:port, got {rendezvous!r}")
        host, port = url.hostname, url.port
    else:
        raise AggBoxError(f"rendezvous must be tcp://host:port or env://, got {rendezvous!r}")
    if rank is None or world is None:
        raise AggBoxError("rank and world are needed (or env:// with RANK and WORLD_SIZE)")
    if not 1 <= world <= MAX_MEMBERS:
        raise AggBoxError(f"world must be 1..{MAX_MEMBERS}, got {world}")
    if not 0 <= rank < world:
        raise AggBoxError(f"rank must be 0..{world - 1}, got {rank}")
    try:
        ip = socket.gethostbyname(host)
    except OSError as exc:
        raise AggBoxError(f"rendezvous host {host!r} does not resolve: {exc}") from None
    return ip, port, rank, world


# ----------------------------------------------------------------- set-up checks -------


def check_can_install() -> None:
    """One line if this process cannot load eBPF programs: not root, no bpf(), no BCC."""
    from aggbox.doctor import bpf_map_create

    if os.geteuid() != 0:
        raise SetupError("AggBox installs eBPF programs on this host: run as root (sudo), "
                         "or run a rank that installs nothing (an allreduce worker)")
    try:
        bpf_map_create()
    except OSError as exc:
        raise SetupError(f"BPF unavailable: the bpf() syscall failed ({exc.strerror}); "
                         "run `aggbox doctor`") from None
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        raise SetupError(f"BPF unavailable: BCC's Python module does not import ({exc}); "
                         "run `sudo make setup`, then `aggbox doctor`") from None


def _ranks(keys: Iterable[str]) -> str:
    return ", ".join(k.rsplit("/", 1)[-1] for k in keys)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def pick_group_ip(ip: str, prefixlen: int, taken: Iterable[str]) -> str:
    """The broadcast group address: from the top of the subnet (as the testbeds do:
    .255.254, .255.253, ...), none of the ranks' addresses."""
    net = ipaddress.IPv4Interface(f"{ip}/{prefixlen}").network
    taken = set(taken)
    for k in range(len(taken) + 1):
        candidate = str(net.broadcast_address - 1 - k)
        if candidate not in taken:
            return candidate
    raise AggBoxError(f"no free group address in {net}")  # unreachable: len + 1 tries


def ensure_group_neighbour(ifname: str, group_ip: str) -> bool:
    """A permanent neighbour ``group_ip`` -> GROUP_MAC on ``ifname``, so the root's one
    send reaches TC egress (an address nobody answers ARP for never does). True if this
    call added it (and so must remove it); a host that answers on it is refused."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            raise AggBoxError(f"interface {ifname!r} not found")
        for n in ipr.get_neighbours(ifindex=links[0]):
            if n.get_attr("NDA_DST") != group_ip:
                continue
            mac = (n.get_attr("NDA_LLADDR") or "").lower()
            if mac == GROUP_MAC:
                return False  # set up by the testbed, or by the host's owner
            if mac and not n["state"] & (NUD_INCOMPLETE | NUD_FAILED):
                raise AggBoxError(f"the broadcast group address {group_ip} is in use (a "
                                  f"host with MAC {mac} answers on {ifname}): pass "
                                  "broadcast_ip= an unused address of the subnet")
        ipr.neigh("replace", dst=group_ip, lladdr=GROUP_MAC, ifindex=links[0],
                  state=NUD_PERMANENT)
    return True


def remove_group_neighbour(ifname: str, group_ip: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr, contextlib.suppress(Exception):
        ipr.neigh("del", dst=group_ip, ifindex=ipr.link_lookup(ifname=ifname)[0])


# ----------------------------------------------------------------- the context ---------


@dataclass
class Context:
    """One rank's handle on an AggBox job (made by :func:`init`): the operations, and
    what this rank installed, removed by :meth:`close`."""

    rank: int
    world: int
    aggregator_rank: int
    members: tuple[Member, ...]  # every rank's address and MAC, by rank
    ifname: str
    mtu: int  # the smallest MTU of all ranks: what every packet must fit
    operations: tuple[str, ...]
    timeout: float  # a collective that makes no progress this long fails
    # what follows is this rank's state (the job holds the token: kept out of repr)
    _job: dict = field(repr=False)
    _store: StoreClient = field(repr=False)
    _server: _Server | None = field(default=None, repr=False)
    _programs: dict[str, Any] = field(default_factory=dict, repr=False)
    _channels: dict[int, Any] = field(default_factory=dict, repr=False)
    _allreducer: Any = field(default=None, repr=False)
    _reduce_calls: int = field(default=0, repr=False)
    _neighbour: str | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)
    auth_key: str = field(default="", repr=False)  # allreduce's key (hex), "" for none

    # -- who is who

    @property
    def workers(self) -> tuple[int, ...]:
        """The allreduce workers (every rank but the aggregator), in worker order."""
        return tuple(r for r in range(self.world) if r != self.aggregator_rank)

    @property
    def is_aggregator(self) -> bool:
        return self.rank == self.aggregator_rank

    @property
    def job_id(self) -> int:
        """The base of this job's ids (each operation uses its own, derived from it)."""
        return int(self._job["job_id"])

    @property
    def broadcast_ip(self) -> str:
        return str(self._job["group_ip"])

    def _port(self, family: str, k: int = 0) -> int:
        return PORT_BASES[family] + (int(self._job["port_offset"]) + k) % PORT_SPAN

    def _need(self, operation: str) -> None:
        if operation not in self.operations:
            raise AggBoxError(f"{operation} was not set up: pass operations= including "
                              f"{operation!r} to aggbox.init")
        if self._closed:
            raise AggBoxError("this AggBox context is closed")

    # -- meeting the other ranks

    def barrier(self, name: str, timeout: float | None = None) -> None:
        """Return once every rank called ``barrier(name)``; a timeout names the ranks
        that did not (each name is used once per job)."""
        self._meet(f"barrier/{name}", self.timeout if timeout is None else timeout)

    def _meet(self, name: str, timeout: float, serve: Any = None) -> list[int]:
        """Every rank's ``name`` key set; raises naming the missing or failed ranks.
        ``serve``: a Broadcaster that answers NACKs while it waits."""
        self._store.set(f"{name}/{self.rank}", "1")
        keys = [f"{name}/{r}" for r in range(self.world)]
        deadline = time.monotonic() + timeout
        while True:
            step = min(0.05, timeout) if serve is not None else timeout
            answer = self._store.wait(keys, max(0.0, min(step, deadline - time.monotonic())))
            _raise_failed(answer)
            if not answer["missing"]:
                return []
            if time.monotonic() >= deadline:
                raise CollectiveTimeout(
                    f"rank {self.rank}: timeout after {timeout:g} s at {name!r}: ranks "
                    f"{_ranks(answer['missing'])} did not arrive",
                    [int(k.rsplit('/', 1)[-1]) for k in answer["missing"]])
            if serve is not None:
                serve.serve(0.02)

    # -- broadcast

    def broadcaster(self, root: int = 0) -> Any:
        """The broadcast channel from ``root``: a :class:`Broadcaster` on the root
        (``send(data)``), a :class:`Receiver` elsewhere (``recv(timeout)``). Collective:
        every rank calls it (the first time for a root), since the root may send only
        once every member's kernel holds the job."""
        self._need("broadcast")
        if not 0 <= root < self.world:
            raise AggBoxError(f"root must be 0..{self.world - 1}, got {root}")
        if root in self._channels:
            return self._channels[root]
        from aggbox.collectives.broadcast import Broadcaster, Receiver

        group = Group(job_id=self.job_id + 1 + root, token=int(self._job["token"]),
                      members=self.members, rank=self.rank, root=root,
                      port=self._port("broadcast", root), ifname=self.ifname,
                      group_ip=self.broadcast_ip)
        programs = self._programs["broadcast"]
        if self.rank == root:
            if self._neighbour is None and ensure_group_neighbour(self.ifname,
                                                                  self.broadcast_ip):
                self._neighbour = self.broadcast_ip
            channel = Broadcaster(group, programs, mtu=self.mtu)
        else:
            channel = Receiver(group, programs)
        self._channels[root] = channel
        self.barrier(f"broadcast/{root}")
        return channel

    def broadcast(self, data: bytes | None = None, root: int = 0,
                  timeout: float | None = None) -> bytes:
        """``data`` from ``root`` to every rank; every rank gets the root's bytes back.

        The root returns once every member's kernel holds them; a member returns the
        next message from the root, or raises :class:`CollectiveTimeout` after
        ``timeout`` seconds (default: the context's)."""
        channel = self.broadcaster(root)
        timeout = self.timeout if timeout is None else timeout
        if self.rank == root:
            if data is None:
                raise AggBoxError(f"rank {root} is the root: pass the data to broadcast")
            channel.send(bytes(data), timeout=timeout)
            return bytes(data)
        message = channel.recv(timeout=timeout)
        if message is None:
            raise CollectiveTimeout(f"rank {self.rank}: no broadcast from rank {root} "
                                    f"within {timeout:g} s", [root])
        return message

    # -- allreduce

    def _reducer(self) -> Any:
        self._need("allreduce")
        if self.is_aggregator:
            raise AggBoxError(f"rank {self.rank} is the aggregator: its kernel sums the "
                              "workers' values and it holds none; call allreduce on the "
                              f"workers (ranks {_ranks(map(str, self.workers))})")
        if self._allreducer is None:
            from aggbox.collectives.allreduce import Allreducer, make_group, max_block

            workers = [Member(i, self.members[r].ip, self.members[r].mac)
                       for i, r in enumerate(self.workers)]
            agg = self.members[self.aggregator_rank]
            group = make_group(self.job_id, int(self._job["token"]), workers,
                               Member(0, agg.ip, agg.mac), rank=self.workers.index(self.rank),
                               port=self._port("allreduce"), ifname=self.ifname,
                               auth_key=self.auth_key)
            self._allreducer = Allreducer(group,
                                          block=max_block(self.mtu, bool(self.auth_key)),
                                          timeout=self.timeout)
        return self._allreducer

    def allreduce(self, array: np.ndarray, op: str = "sum",
                  out: np.ndarray | None = None) -> np.ndarray:
        """The element-wise sum (``op="mean"``: average) of ``array`` over the workers,
        summed in the aggregator's kernel. float32/float64 are quantized (within
        :meth:`error_bound`); int32 is summed exactly (wrapping). Every worker calls it
        with the same shape, in the same order; the aggregator rank does not call it."""
        return self._reducer().allreduce(array, op=op, out=out)

    def error_bound(self, result: np.ndarray) -> np.ndarray:
        """Per element, the bound on |result - exact float64 sum| of the last float
        :meth:`allreduce` (its ``op="sum"`` result)."""
        return self._reducer().error_bound(result)

    # -- reduce by key

    def reduce_by_key(self, pairs: Mapping[bytes, int] | Iterable[tuple[bytes, int]] | Any,
                      reducers: Sequence[int] | None = None, combine: bool = True,
                      timeout: float | None = None) -> Mapping[bytes, int] | None:
        """Sum int64 values per key over every rank, in the reducers' kernels.

        Every rank calls it with its own pairs (a ``{key: value}`` mapping such as a
        Counter, ``(key, value)`` pairs, or ``aggbox.collectives.reduce.Pairs``).
        ``reducers`` (default: every rank) share the keys by ``crc32(key) % len``; a
        reducer returns ``{key: sum}`` for its keys (a read-only Mapping), other ranks
        None. Each call is its own kernel job."""
        self._need("reduce_by_key")
        from aggbox.collectives.reduce import ReduceByKey

        reducers = list(range(self.world) if reducers is None else reducers)
        if not reducers or any(not 0 <= r < self.world for r in reducers):
            raise AggBoxError(f"reducers must be ranks 0..{self.world - 1}, got {reducers}")
        k = self._reduce_calls
        self._reduce_calls += 1
        group = Group(job_id=self.job_id + REDUCE_JOBS + k, token=int(self._job["token"]),
                      members=self.members, rank=self.rank,
                      port=self._port("reduce_by_key", k), ifname=self.ifname,
                      options={"mappers": list(range(self.world)), "reducers": reducers})
        endpoint = ReduceByKey(group, self._programs.get("reduce_by_key"), combine=combine,
                               mtu=self.mtu,
                               timeout=self.timeout if timeout is None else timeout)
        try:
            self.barrier(f"reduce/{k}")  # every reducer's kernel holds the job
            return endpoint.run(pairs)
        finally:
            endpoint.close()

    # -- closing

    def close(self, timeout: float = 30.0) -> list[int]:
        """Wait (up to ``timeout`` s) for every rank to close, so that no host removes
        what another still uses (the aggregator's programs, a root answering NACKs),
        then remove everything this rank installed. Returns the ranks that did not come
        (empty: all did). Idempotent."""
        if self._closed:
            return []
        missing: list[int] = []
        try:
            self._meet("close", timeout, serve=self._channels.get(self.rank))
        except CollectiveTimeout as exc:
            missing = exc.missing
        except AggBoxError:
            missing = [r for r in range(self.world) if r != self.rank]
        finally:
            self._closed = True
            self._teardown()
        return missing

    def _teardown(self, failed: bool = False) -> None:
        """Remove what this rank installed; ``failed``: init did not complete (rank 0
        keeps the store up a moment, so that the waiting ranks read why)."""
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                channel.close()
        self._channels.clear()
        if self._allreducer is not None:
            self._allreducer.close()
        if "reduce_by_key" in self._programs:
            from aggbox.collectives.reduce import wait_lingering

            wait_lingering()
        for programs in self._programs.values():
            with contextlib.suppress(Exception):
                programs.close()
        self._programs.clear()
        if self._neighbour is not None:
            remove_group_neighbour(self.ifname, self._neighbour)
            self._neighbour = None
        with contextlib.suppress(AggBoxError):
            if failed:
                time.sleep(1.0 if self._server is not None else 0.0)
            else:
                # every rank is past the close barrier before rank 0 stops the store
                self._store.set(f"left/{self.rank}", "1")
                if self._server is not None:
                    self._store.wait([f"left/{r}" for r in range(self.world)], 5.0, "")
        self._store.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and not self._closed:
            # the others stop waiting for this rank at their next barrier
            with contextlib.suppress(Exception):
                self._store.set(f"failed/{self.rank}", _first_line(exc))
        self.close()


def _raise_failed(answer: dict) -> None:
    for key, why in sorted(answer["failed"].items()):
        raise AggBoxError(f"rank {key.rsplit('/', 1)[-1]} failed: {why}")


# ----------------------------------------------------------------- init ----------------


def init(rank: int | None = None, world: int | None = None, rendezvous: str = "env://",
         aggregator_rank: int = 0, iface: str | None = None,
         operations: Sequence[str] = OPERATIONS, broadcast_ip: str | None = None,
         timeout: float = 30.0, setup_timeout: float = 120.0,
         auth_key: bytes | str | None = None) -> Context:
    """Join the AggBox job of ``world`` ranks that meet at ``rendezvous`` and install
    this host's programs; returns the :class:`Context` (close it, or use ``with``).

    ``rendezvous``: ``tcp://host:port`` (rank 0 serves the store there, so ``host`` is
    rank 0's address) or ``env://`` (MASTER_ADDR, MASTER_PORT or AGGBOX_MASTER_PORT,
    RANK, WORLD_SIZE). ``aggregator_rank``: the rank whose kernel sums allreduces (it is
    not a worker). ``iface``: the interface to use (default: the one that routes to the
    rendezvous address). ``operations``: which of :data:`OPERATIONS` to set up (each
    is a program to compile). ``broadcast_ip``: the broadcast group address (default:
    from the top of the subnet; it must be unused). ``timeout``: a collective that makes
    no progress that long fails; ``setup_timeout``: the rendezvous and the installs.
    ``auth_key``: 16 bytes (or 32 hex digits; default: the environment's
    AGGBOX_AUTH_KEY) that make allreduce an authenticated job: the aggregator's kernel
    takes only blocks tagged under the key (aggbox/auth.py), so a host that sniffed the
    token still cannot join in. Give every rank the same key out of band: it never
    travels, not even through the rendezvous (which compares a check value only).
    Every rank passes the same ``world``, ``aggregator_rank``, ``operations`` and key.
    """
    host, port, rank, world = parse_rendezvous(rendezvous, rank, world)
    key_hex = auth.key_hex(auth_key)
    operations = tuple(operations)
    unknown = sorted(set(operations) - set(OPERATIONS))
    if unknown:
        raise AggBoxError(f"unknown operations {unknown}; known: {', '.join(OPERATIONS)}")
    if not 0 <= aggregator_rank < world:
        raise AggBoxError(f"aggregator_rank must be 0..{world - 1}, got {aggregator_rank}")
    if "allreduce" in operations and world < 2:
        raise AggBoxError("allreduce needs 2 or more ranks: the aggregator and a worker")
    if iface is None:
        iface, _, _ = interface_to(host)
    ip, mac, prefixlen = interface_address(iface)
    server = serve_store(host, port) if rank == 0 else None
    try:
        store = StoreClient(host, port, setup_timeout)
    except BaseException:
        if server is not None:
            server.shutdown()
            server.server_close()
        raise
    me = {"ip": ip, "mac": mac, "mtu": interface_mtu(iface), "prefixlen": prefixlen,
          "world": world, "aggregator_rank": aggregator_rank,
          "operations": list(operations), "auth": auth.check_value(key_hex)}
    ctx = Context(rank, world, aggregator_rank, (), iface, 0, operations, timeout, {},
                  store, server)
    ctx.auth_key = key_hex
    try:
        if not store.set(f"member/{rank}", json.dumps(me), exclusive=True):
            raise AggBoxError(f"rank {rank} joined twice: another process uses --rank "
                              f"{rank}")
        job = _agree(store, rank, world, me, setup_timeout, broadcast_ip)
        ctx.members = tuple(Member(r, m["ip"], m["mac"]) for r, m in enumerate(job["members"]))
        ctx.mtu = min(m["mtu"] for m in job["members"])
        ctx._job = job
        _install(ctx)
        ctx._meet("installed", setup_timeout)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            store.set(f"failed/{rank}", _first_line(exc))
        ctx._closed = True
        ctx._teardown(failed=True)
        raise
    return ctx


def _agree(store: StoreClient, rank: int, world: int, me: dict, timeout: float,
           broadcast_ip: str | None) -> dict:
    """Every rank's address, and the job rank 0 drew, once every rank joined."""
    keys = [f"member/{r}" for r in range(world)]
    if rank == 0:
        answer = store.wait(keys, timeout)
        _raise_failed(answer)
        if answer["missing"]:
            raise AggBoxError(f"rendezvous timeout after {timeout:g} s: ranks "
                              f"{_ranks(answer['missing'])} of {world} did not join "
                              f"{store.where}")
        members = [json.loads(answer["values"][k]) for k in keys]
        _check_members(members, me)
        if broadcast_ip is not None:
            _check_group_ip(broadcast_ip, members)
        job = {"job_id": 1 + secrets.randbelow(2**31 - 1 - JOB_SPAN),
               "token": 1 + secrets.randbelow(2**32 - 1),
               "port_offset": secrets.randbelow(PORT_SPAN),
               "group_ip": broadcast_ip or pick_group_ip(me["ip"], me["prefixlen"],
                                                         (m["ip"] for m in members)),
               "members": members}
        store.set("job", json.dumps(job))
        return job
    answer = store.wait(["job"], timeout)
    _raise_failed(answer)
    if answer["missing"]:
        joined = store.wait(keys, 0.0)
        # Worded as rank 0's timeout is: whichever rank times out first, every rank
        # reports the same message (the others relay the first failure).
        who = (f"ranks {_ranks(joined['missing'])} of {world} did not join"
               if joined["missing"] else "rank 0 published no job")
        raise AggBoxError(f"rendezvous timeout after {timeout:g} s at {store.where}: {who}")
    return json.loads(answer["values"]["job"])


def _check_members(members: list[dict], me: dict) -> None:
    for r, m in enumerate(members):
        if m.get("auth") != me["auth"]:
            raise AggBoxError(f"rank {r} and rank 0 were given different auth keys (or only "
                              "one of them a key): give every rank the same AGGBOX_AUTH_KEY")
        for what in ("world", "aggregator_rank", "operations"):
            if m[what] != me[what]:
                raise AggBoxError(f"rank {r} passed {what}={m[what]}, rank 0 "
                                  f"{what}={me[what]}: every rank must pass the same")
    seen: dict[str, int] = {}
    for r, m in enumerate(members):
        if m["ip"] in seen:
            raise AggBoxError(f"ranks {seen[m['ip']]} and {r} are both on {m['ip']}: "
                              "AggBox needs one rank per host (network namespace)")
        seen[m["ip"]] = r


def _check_group_ip(group_ip: str, members: list[dict]) -> None:
    try:
        ipaddress.IPv4Address(group_ip)
    except ValueError:
        raise AggBoxError(f"broadcast_ip {group_ip!r} is not an IPv4 address") from None
    for r, m in enumerate(members):
        if m["ip"] == group_ip:
            raise AggBoxError(f"broadcast_ip {group_ip} is rank {r}'s address: it must be "
                              "an address no host uses")


def _install(ctx: Context) -> None:
    """This host's programs: what belongs on it, and nothing else."""
    wanted = [op for op in ctx.operations if op != "allreduce" or ctx.is_aggregator]
    if not wanted:
        return  # an allreduce worker: sockets only
    check_can_install()
    if "broadcast" in wanted:
        from aggbox.collectives.broadcast import BroadcastPrograms

        ctx._programs["broadcast"] = BroadcastPrograms(ctx.ifname)
    if "reduce_by_key" in wanted:
        from aggbox.collectives.reduce import ReduceByKeyPrograms

        ctx._programs["reduce_by_key"] = ReduceByKeyPrograms(ctx.ifname)
    if "allreduce" in wanted:
        from aggbox.collectives.allreduce import AggregatorPrograms, make_group

        programs = ctx._programs["allreduce"] = AggregatorPrograms(ctx.ifname)
        workers = [Member(i, ctx.members[r].ip, ctx.members[r].mac)
                   for i, r in enumerate(ctx.workers)]
        programs.install_job(make_group(ctx.job_id, int(ctx._job["token"]), workers,
                                        ctx.members[ctx.rank], rank=0,
                                        port=ctx._port("allreduce"), ifname=ctx.ifname,
                                        auth_key=ctx.auth_key))
