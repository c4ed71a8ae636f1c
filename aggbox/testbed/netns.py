"""The netns testbed: N hosts (network namespaces) on a bridge in its own namespace.

Layout of a run ``R`` with prefix ``P``::

    P-R-sw:  br0 ── h0 ── h1 ── ... (switch-side veth ends, enslaved to br0)
    P-R-h0:  lo, eth0 (10.213.0.1)      peer of h0
    P-R-h1:  lo, eth0 (10.213.0.2)      peer of h1

Nothing is created in the root namespace: the bridge lives in ``P-R-sw`` so the machine's
firewall (Docker sets FORWARD to DROP) and its own links are never involved. Every
namespace is listed in a state file before it is created, so a run that dies half-way is
still removed by :func:`down_run` / :func:`down_all`.

Speed: commands are batched (``ip -batch``, ``tc -batch``) and per-namespace work runs in
threads that ``setns()`` into the namespace; a process started from such a thread
inherits the thread's namespace, and ``/proc/sys/net`` opened from it shows that
namespace's sysctls, so no ``nsenter``/``ip netns exec`` process is needed for setup.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from aggbox.collectives.group import RESERVED_PORTS
from aggbox.errors import TestbedError
from aggbox.testbed.base import Host, Netem, Testbed
from aggbox.testbed.impair import apply_impairment

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
DEFAULT_STATE_DIR = "/run/aggbox/testbeds"
DEFAULT_PREFIX = "abx"
# Destination MAC of the virtual group addresses; matches collectives.group.Group.group_mac.
GROUP_MAC = "02:ab:ff:ff:ff:fe"
BRIDGE = "br0"
HOST_IFNAME = "eth0"
# Netem's default 1000-packet queue drops bursts once a delay is set: loss nobody asked for.
NETEM_LIMIT = 10000
MAX_PREFIX_LEN = 12
MAX_RUN_ID_LEN = 16
MAX_HOSTS = 4096  # keeps switch-side names (h4095) and MACs (02:ab:..:hi:lo) well-formed
# TCP connections whose member side listens on one of these ports ACK every segment at
# once (route metric quickack 1, chosen by a policy rule): baselines whose completion is
# the members' kernel ACK (tcp_kack) must not wait out delayed ACKs (40 ms and more),
# while every other TCP system keeps Linux's default delayed ACKs.
KERNEL_ACK_PORTS = (45200, 45299)
QUICKACK_TABLE = 213
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------------------------------
# Names, addresses and netem arguments (pure; unit-tested without root)


def state_dir() -> Path:
    """Where state files live (``AGGBOX_STATE_DIR`` overrides, e.g. for tests)."""
    return Path(os.environ.get("AGGBOX_STATE_DIR", DEFAULT_STATE_DIR))


def default_prefix() -> str:
    """Namespace prefix (``AGGBOX_PREFIX`` overrides, so a test session can own its names)."""
    return os.environ.get("AGGBOX_PREFIX", DEFAULT_PREFIX)


def validate_name(kind: str, value: str, max_len: int) -> str:
    """Accept letters, digits and inner dashes, at most ``max_len`` characters."""
    if not isinstance(value, str) or len(value) > max_len or not _NAME_RE.fullmatch(value):
        raise TestbedError(
            f"invalid {kind} {value!r}: use 1-{max_len} letters, digits or dashes "
            "(not at either end)"
        )
    return value


def new_run_id() -> str:
    return secrets.token_hex(3)


def netns_names(prefix: str, run_id: str, n_hosts: int) -> tuple[str, list[str]]:
    """(switch namespace, host namespaces) of a run."""
    base = f"{prefix}-{run_id}"
    return f"{base}-sw", [f"{base}-h{i}" for i in range(n_hosts)]


def parse_subnet(subnet: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise TestbedError(f"invalid subnet {subnet!r}: {exc} (e.g. 10.213.0.0/16)") from None


def host_ip(net: ipaddress.IPv4Network, index: int) -> str:
    """Host ``index`` gets the subnet's (index + 1)-th address: 10.213.0.1, .2, ..."""
    return str(net.network_address + index + 1)


def group_addresses(net: ipaddress.IPv4Network, count: int) -> list[str]:
    """Virtual group destinations from the top of the subnet: .255.254, .255.253, ..."""
    return [str(net.broadcast_address - 1 - k) for k in range(count)]


def quickack_lines(net: ipaddress.IPv4Network, ip: str, ifname: str) -> list[str]:
    """``ip -batch`` lines giving TCP from :data:`KERNEL_ACK_PORTS` a copy of the host's
    connected route with ``quickack 1``. A rule on the source port, not the main route:
    TCP_QUICKACK set by the application would be reset by the kernel and ties the ACK to
    the application reading; quickack on the main route would change every other TCP
    baseline's ACK pattern too."""
    low, high = KERNEL_ACK_PORTS
    return [f"rule add ipproto tcp sport {low}-{high} lookup {QUICKACK_TABLE} pref 1000",
            f"route add {net} dev {ifname} src {ip} table {QUICKACK_TABLE} quickack 1"]


def check_capacity(net: ipaddress.IPv4Network, n_hosts: int, n_groups: int) -> None:
    usable = net.num_addresses - 2  # network and broadcast addresses
    if n_hosts + n_groups > usable:
        raise TestbedError(
            f"subnet {net} has {usable} usable addresses, but {n_hosts} hosts and "
            f"{n_groups} group addresses need {n_hosts + n_groups}: use a larger subnet"
        )


def _run_bytes(run_id: str) -> bytes:
    return hashlib.sha256(run_id.encode()).digest()[:2]


def host_mac(run_id: str, index: int) -> str:
    """Locally administered 02:ab:RR:RR:hi:lo; RR:RR from the run id, so runs differ."""
    r = _run_bytes(run_id)
    return f"02:ab:{r[0]:02x}:{r[1]:02x}:{index >> 8:02x}:{index & 0xFF:02x}"


def switch_port_mac(run_id: str, index: int) -> str:
    """Switch-side veth ends get fixed MACs too (02:ac:...), so runs are reproducible."""
    return "02:ac" + host_mac(run_id, index)[5:]


def check_impairment(netem: Netem) -> None:
    """Refuse impossible impairments with a line that says which value is wrong."""
    for name in ("loss_pct", "duplicate_pct", "reorder_pct", "burst_enter_pct",
                 "burst_leave_pct", "burst_loss_pct"):
        value = getattr(netem, name)
        if not 0 <= value <= 100:
            raise TestbedError(f"{name} must be a percentage within 0..100, got {value:g}")
    if netem.delay_ms < 0 or netem.jitter_ms < 0:
        raise TestbedError("delay and jitter must not be negative")
    if netem.burst_enter_pct and netem.burst_loss_pct and not netem.burst_leave_pct:
        raise TestbedError("burst loss with leave 0 never leaves the bad state: a dead link")


def netem_args(netem: Netem, with_seed: bool = True) -> list[str]:
    """``tc ... netem`` arguments for ``netem``; ``with_seed`` False for old iproute2."""
    if netem.reorder_pct and not netem.delay_ms:
        # netem reorders by sending some packets *without* the delay; with no delay it
        # silently does nothing, which would make a "reordering" experiment a lie.
        raise TestbedError("netem reorder needs a delay (e.g. --delay 1): it has no effect alone")
    args = ["limit", str(NETEM_LIMIT)]
    if netem.delay_ms:
        args += ["delay", f"{netem.delay_ms:g}ms"]
        if netem.jitter_ms:
            args.append(f"{netem.jitter_ms:g}ms")
    if netem.loss_pct:
        args += ["loss", f"{netem.loss_pct:g}%"]
    if netem.duplicate_pct:
        args += ["duplicate", f"{netem.duplicate_pct:g}%"]
    if netem.reorder_pct:
        args += ["reorder", f"{netem.reorder_pct:g}%"]
    if with_seed:
        args += ["seed", str(netem.seed)]
    return args


# ---------------------------------------------------------------------------------------
# Running code inside a namespace


def _setns(netns: str) -> None:
    """Move the *calling thread* into ``netns`` (other threads keep theirs)."""
    try:
        fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TestbedError(f"namespace {netns} does not exist (testbed down?)") from None
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise TestbedError(f"setns({netns}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns_parallel(jobs: Sequence[tuple[str, Callable[[], T]]]) -> list[T]:
    """Run each ``(netns, fn)`` in a fresh thread inside ``netns``; results in order.

    Fresh threads because a thread that called setns stays in that namespace: a pooled
    thread would leak it into unrelated work. The first exception is re-raised.
    """
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)

    def work(k: int, netns: str, fn: Callable[[], T]) -> None:
        try:
            _setns(netns)
            results[k] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors[k] = exc

    threads = [
        threading.Thread(target=work, args=(k, ns, fn), name=f"netns-{ns}", daemon=True)
        for k, (ns, fn) in enumerate(jobs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return results


def run_in_netns(netns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh thread inside ``netns``; returns or re-raises."""
    return run_in_netns_parallel([(netns, lambda: fn(*args, **kwargs))])[0]


def _run(argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a setup command; failures become a TestbedError quoting the command's stderr."""
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise TestbedError(f"{' '.join(argv[:3])} failed: {' | '.join(detail[-3:])}")
    return proc.stdout + proc.stderr


def _batch(tool: str, lines: Sequence[str], force: bool = False) -> None:
    """One ``ip``/``tc`` process for many commands (in the calling thread's namespace)."""
    if lines:
        _run([tool, *(["-force"] if force else []), "-batch", "-"], "\n".join(lines) + "\n")


def _write_sysctls(values: dict[str, str], optional: bool = False) -> None:
    """Write ``net.x.y`` sysctls of the calling thread's namespace through /proc/sys."""
    for key, value in values.items():
        path = Path("/proc/sys", *key.split("."))
        if optional and not path.exists():
            continue
        path.write_text(value)


_netem_support: tuple[bool, bool] | None = None


def netem_support() -> tuple[bool, bool]:
    """(kernel has the netem qdisc, ``tc`` knows netem's ``seed``), probed once.

    Runs in the calling thread's namespace and briefly adds a qdisc to its ``lo``: call it
    inside a testbed namespace (``NetnsTestbed.netem_support``), never in the root one.
    """
    global _netem_support
    if _netem_support is None:
        kernel = _run(["tc", "qdisc", "add", "dev", "lo", "root", "netem"], check=False)
        has_netem = "unknown" not in kernel.lower()  # "Specified qdisc kind is unknown"
        _run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
        # "help" makes tc print usage and exit before any netlink request; an unknown
        # "seed" (iproute2 < 6.6) is reported as 'What is "seed"?' first.
        usage = _run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "seed", "1", "help"],
                     check=False)
        _netem_support = (has_netem, 'What is "seed"' not in usage)
    return _netem_support


# ---------------------------------------------------------------------------------------
# Hosts and the testbed


@dataclass
class NetnsHost(Host):
    """A host that is a network namespace under /run/netns."""

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    def command(self, argv: Sequence[str]) -> list[str]:
        # nsenter, not `ip netns exec`: the latter remounts /sys and hides /sys/fs/bpf pins.
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in a fresh thread inside this host's namespace (sockets, netlink,
        attaches); returns its result or re-raises its exception."""
        return run_in_netns(self.netns, fn, *args, **kwargs)


# Testbeds this process brought up and must tear down on exit or SIGTERM.
_owned: list[NetnsTestbed] = []
_owned_lock = threading.Lock()
_saved_handlers: dict[int, Any] = {}
_TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_system_exit(signum: int, _frame: Any) -> None:
    # An exception unwinds `with` blocks and finally clauses, which tear testbeds down.
    raise SystemExit(128 + signum)


def _own(tb: NetnsTestbed) -> None:
    with _owned_lock:
        _owned.append(tb)
        if _saved_handlers or threading.current_thread() is not threading.main_thread():
            return  # already installed, or not allowed: only the main thread may install
        for sig in _TEARDOWN_SIGNALS:
            _saved_handlers[sig] = signal.signal(sig, _raise_system_exit)


def _disown(tb: NetnsTestbed) -> None:
    with _owned_lock:
        if tb in _owned:
            _owned.remove(tb)
        if _owned or threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in _saved_handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        _saved_handlers.clear()


@atexit.register
def _down_owned_at_exit() -> None:
    for tb in list(_owned):
        tb.down()


def require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("the netns testbed creates namespaces and links: run it as root")


def _require_tools(tools: Sequence[str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise TestbedError(
            f"missing {', '.join(missing)}: install iproute2, util-linux and ethtool"
        )


class NetnsTestbed(Testbed):
    """N hosts in network namespaces on one bridge. ``with NetnsTestbed(4) as tb: ...``"""

    backend = "netns"

    def __init__(
        self,
        n_hosts: int,
        run_id: str | None = None,
        subnet: str = "10.213.0.0/16",
        netem: Netem | None = None,
        tx_offload: bool = True,
        prefix: str | None = None,
        mtu: int = 1500,
        group_ips: int = 4,
        persistent: bool = False,
    ):
        """``prefix`` defaults to ``AGGBOX_PREFIX`` or "abx". ``persistent`` keeps the
        testbed up when this process exits (``aggbox testbed up``)."""
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise TestbedError(f"n_hosts must be 1..{MAX_HOSTS}, got {n_hosts}")
        if not 68 <= mtu <= 65535:
            raise TestbedError(f"mtu must be 68..65535, got {mtu}")
        self.prefix = validate_name("prefix", prefix or default_prefix(), MAX_PREFIX_LEN)
        self.run_id = validate_name("run id", run_id or new_run_id(), MAX_RUN_ID_LEN)
        self.net = parse_subnet(subnet)
        check_capacity(self.net, n_hosts, group_ips)
        self.subnet, self.mtu, self.tx_offload = str(self.net), mtu, tx_offload
        if netem is not None and not netem.is_noop():
            check_impairment(netem)  # refuse a bad impairment before anything is created
        self.netem, self.persistent = netem, persistent
        self.netem_seed_applied: bool | None = None
        self.group_ips: list[str] = group_addresses(self.net, group_ips)
        self.switch_ns, host_ns = netns_names(self.prefix, self.run_id, n_hosts)
        self.hosts: list[NetnsHost] = [
            NetnsHost(name=f"h{i}", index=i, ip=host_ip(self.net, i),
                      mac=host_mac(self.run_id, i), ifname=HOST_IFNAME, netns=ns)
            for i, ns in enumerate(host_ns)
        ]
        self.is_up = False
        self._claimed = False  # only a claimed (or loaded) run may delete its namespaces

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_ns, *(h.netns for h in self.hosts)]

    @property
    def state_file(self) -> Path:
        return state_dir() / f"{self.run_id}.json"

    # -- life cycle

    def __enter__(self) -> NetnsTestbed:
        return self.up()

    def up(self) -> NetnsTestbed:
        require_root()
        _require_tools(["ip", "tc", "nsenter"] + ([] if self.tx_offload else ["ethtool"]))
        self._claim()  # state file first: a crash from here on is still cleaned up
        if not self.persistent:
            _own(self)
        try:
            _batch("ip", [f"netns add {ns}" for ns in self.namespaces])
            run_in_netns(self.switch_ns, self._setup_switch)
            run_in_netns_parallel([(h.netns, lambda h=h: self._setup_host(h)) for h in self.hosts])
            if not self.tx_offload:
                run_in_netns(self.switch_ns, self._switch_tx_offload_off)
            self.is_up = True
            if self.netem is not None and not self.netem.is_noop():
                self.set_netem(self.netem)
        except BaseException:
            self.down()  # also on KeyboardInterrupt / SIGTERM's SystemExit mid-way
            raise
        return self

    def down(self) -> None:
        """Delete every namespace of the run (and with them every link); idempotent."""
        _disown(self)
        if not self._claimed:
            return  # never came up, or its run id belonged to someone else
        _delete_namespaces(self.namespaces)
        # Pins tagged with the run (<run>-h3, <run>-agg) that a node killed before it
        # could unpin left on bpffs: they go with the testbed, like its namespaces.
        _remove_run_pins([self.run_id])
        self.state_file.unlink(missing_ok=True)
        self.is_up = self._claimed = False

    def _claim(self) -> None:
        taken = [ns for ns in self.namespaces if (NETNS_DIR / ns).exists()]
        if taken or self.state_file.exists():
            what = ", ".join(taken[:2]) or str(self.state_file)
            raise TestbedError(
                f"testbed run id {self.run_id!r} is in use ({what}): pick another id or "
                f"remove it with `aggbox testbed down --id {self.run_id}`"
            )
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes racing for the same run id cannot both win.
        with open(self.state_file, "x") as f:
            json.dump(self._state(), f, indent=1)
        self._claimed = True

    def _state(self) -> dict:
        return {**self.describe(), "prefix": self.prefix, "group_ips": len(self.group_ips),
                "namespaces": self.namespaces, "pid": os.getpid(),
                "persistent": self.persistent, "created": time.time(),
                "host_table": [asdict(h) for h in self.hosts]}

    def _rewrite_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state(), indent=1))
        tmp.replace(self.state_file)

    # -- per-namespace setup (each runs in a thread inside its namespace)

    def _setup_switch(self) -> None:
        # br_netfilter would run every bridged frame through iptables (~4 us each).
        _write_sysctls({f"net.bridge.bridge-nf-call-{t}": "0"
                        for t in ("iptables", "ip6tables", "arptables")}, optional=True)
        _write_sysctls(_NO_IPV6)
        lines = [f"link add {BRIDGE} type bridge stp_state 0 mcast_snooping 0",
                 f"link set {BRIDGE} up"]
        for h in self.hosts:
            port = f"h{h.index}"
            # Created here with the peer placed straight into the host: the root namespace
            # never sees either end.
            lines += [
                f"link add {port} address {switch_port_mac(self.run_id, h.index)} mtu {self.mtu}"
                f" type veth peer name {HOST_IFNAME} address {h.mac} mtu {self.mtu}"
                f" netns {h.netns}",
                f"link set {port} master {BRIDGE} up",
                # No unknown-unicast flooding: a frame for one host never reaches another.
                # Multicast (mcast baseline) still floods: snooping is off on br0, so
                # every port gets a group's frames and the hosts' IP layer keeps members'.
                f"link set {port} type bridge_slave flood off mcast_flood on",
            ]
        _batch("ip", lines)
        # Static forwarding entries: the bridge knows every host from the start, instead
        # of flooding until it has learned them (which made members see, and acknowledge
        # in their kernel, copies that were meant for others).
        _batch("bridge", [f"fdb replace {h.mac} dev h{h.index} master static"
                          for h in self.hosts])

    def _setup_host(self, host: NetnsHost) -> None:
        _write_sysctls({
            "net.ipv4.conf.all.rp_filter": "0",
            f"net.ipv4.conf.{HOST_IFNAME}.rp_filter": "0",
            # accept_local: the fan-out sends a copy back to the sender itself.
            "net.ipv4.conf.all.accept_local": "1",
            f"net.ipv4.conf.{HOST_IFNAME}.accept_local": "1",
            # AggBox's and the baselines' ports lie in the ephemeral range: keep them out.
            "net.ipv4.ip_local_reserved_ports": "{}-{}".format(*RESERVED_PORTS),
            **_NO_IPV6,
        })
        plen = self.net.prefixlen
        lines = ["link set lo up", f"addr add {host.ip}/{plen} dev {HOST_IFNAME}"]
        # Permanent neighbours: no ARP traffic during measurements, and the group
        # addresses (which nobody owns) must resolve or packets never reach TC egress.
        for other in self.hosts:
            if other is not host:
                lines.append(f"neigh add {other.ip} lladdr {other.mac} dev {HOST_IFNAME}"
                             " nud permanent")
        for gip in self.group_ips:
            lines.append(f"neigh add {gip} lladdr {GROUP_MAC} dev {HOST_IFNAME} nud permanent")
        lines.append(f"link set {HOST_IFNAME} up")
        lines += quickack_lines(self.net, host.ip, HOST_IFNAME)  # needs the link up
        _batch("ip", lines)
        if not self.tx_offload:
            _run(["ethtool", "-K", HOST_IFNAME, "tx", "off"])

    def _switch_tx_offload_off(self) -> None:
        for h in self.hosts:
            _run(["ethtool", "-K", f"h{h.index}", "tx", "off"])

    # -- impairments

    def set_netem(self, netem: Netem | None) -> None:
        """Impair every host link in both directions; ``None`` or a no-op clears it.

        Loss, duplication and reordering come from bpf/impair.c on the switch-side veths
        (seeded, and available on kernels without sch_netem, like this project's). Delay
        and jitter need the netem qdisc, applied to both ends of each link: a host-to-host
        path crosses two links, so it sees the delay twice."""
        if not self.is_up:
            raise TestbedError("set_netem needs a testbed that is up")
        netem = None if netem is None or netem.is_noop() else netem
        self._set_delay(netem)
        apply_impairment(self.switch_ns, [f"h{h.index}" for h in self.hosts],
                         loss=netem.loss_pct if netem else 0.0,
                         duplicate=netem.duplicate_pct if netem else 0.0,
                         reorder=netem.reorder_pct if netem else 0.0,
                         seed=netem.seed if netem else 1,
                         burst=netem.burst if netem else (0.0, 0.0, 0.0))
        self.netem = netem
        self._rewrite_state()

    def _set_delay(self, netem: Netem | None) -> None:
        if netem is None or not netem.delay_ms:
            if self.netem_seed_applied is not None:  # a delay was set earlier: remove it
                self._tc_on_all_links("qdisc del dev {dev} root", force=True)
            self.netem_seed_applied = None
            return
        has_netem, seed = self.netem_support()
        if not has_netem:
            raise TestbedError(
                "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is off), so link delay "
                "cannot be emulated: drop --delay (loss, duplication and reordering work "
                "without it) or use a kernel with sch_netem")
        delay_only = Netem(delay_ms=netem.delay_ms, jitter_ms=netem.jitter_ms, seed=netem.seed)
        self._tc_on_all_links("qdisc replace dev {dev} root netem "
                              + " ".join(netem_args(delay_only, seed)), force=False)
        self.netem_seed_applied = seed

    def _tc_on_all_links(self, cmd: str, force: bool) -> None:
        jobs = [(self.switch_ns, lambda: _batch(
            "tc", [cmd.format(dev=f"h{h.index}") for h in self.hosts], force))]
        jobs += [(h.netns, lambda: _batch("tc", [cmd.format(dev=HOST_IFNAME)], force))
                 for h in self.hosts]
        run_in_netns_parallel(jobs)

    def netem_support(self) -> tuple[bool, bool]:
        """(kernel has netem, tc passes its seed); probed inside the switch namespace."""
        return run_in_netns(self.switch_ns, netem_support)

    def describe(self) -> dict:
        netem = self.netem if self.netem is not None and not self.netem.is_noop() else None
        return {
            **super().describe(),
            "subnet": self.subnet,
            "mtu": self.mtu,
            "tx_offload": self.tx_offload,
            "netem": asdict(netem) if netem else None,
            # False: this iproute2 cannot pass netem's seed, so loss patterns differ per run.
            "netem_seed_applied": self.netem_seed_applied,
            "netem_scope": "per link; a host-to-host path crosses two links",
            "ipv6": False,
        }


# Hosts speak IPv4 only: IPv6 router solicitations, MLD and DAD would otherwise put
# stray packets through the eBPF programs and the counters.
_NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}


# ---------------------------------------------------------------------------------------
# Leftovers: state files, crashed runs, `aggbox testbed down`


def _netns_inode(netns: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / netns).st_ino
    except FileNotFoundError:
        return None


def _kill_processes_in(namespaces: Sequence[str], grace_s: float = 1.0) -> None:
    """End processes still running inside ``namespaces`` (left by an experiment), so that
    deleting the namespace also frees its links instead of leaving them to a ghost."""
    inodes = {i for ns in namespaces if (i := _netns_inode(ns)) is not None}
    pids = []
    for entry in os.scandir("/proc") if inodes else []:
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino in inodes:
                    pids.append(int(entry.name))
            except OSError:
                continue  # exited meanwhile, or a kernel thread
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in pids if _signal(p, sig)]
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = [p for p in pids if _alive(p)]


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie waiting for its parent to reap it."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].startswith("Z")
    except FileNotFoundError:
        return False


def list_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Namespaces under /run/netns whose names start with ``{prefix}-``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{prefix}-"))


def read_states() -> list[dict]:
    """Every state file's content (unreadable ones are reported by name only)."""
    states = []
    for path in sorted(state_dir().glob("*.json")):
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            states.append({"run_id": path.stem, "namespaces": [], "corrupt": True})
    return states


def _delete_namespaces(namespaces: Sequence[str]) -> list[str]:
    present = [ns for ns in namespaces if (NETNS_DIR / ns).exists()]
    _kill_processes_in(present)
    if present:
        _batch("ip", [f"netns del {ns}" for ns in present], force=True)
    return present


def down_run(run_id: str, prefix: str | None = None) -> list[str]:
    """Remove one run's namespaces (from its state file, or by name if that is gone)
    and its state file; returns the namespaces deleted."""
    require_root()
    validate_name("run id", run_id, MAX_RUN_ID_LEN)
    path = state_dir() / f"{run_id}.json"
    try:
        namespaces = json.loads(path.read_text())["namespaces"]
    except (OSError, ValueError, KeyError):
        prefix = prefix or default_prefix()
        namespaces = [ns for ns in list_namespaces(prefix) if ns.startswith(f"{prefix}-{run_id}-")]
    deleted = _delete_namespaces(namespaces)
    _remove_run_pins([run_id])
    path.unlink(missing_ok=True)
    return deleted


def run_ids_of(netns: str, prefix: str) -> list[str]:
    """Possible run ids in a namespace name ``{prefix}-{run}-sw`` / ``{prefix}-{run}-h3``.
    A longer prefix under ``prefix`` (a test session's ``abx-t1f2e``) hides where the run
    id starts, so every dash-separated tail is a candidate: ``t1f2e-ab12cd``, ``ab12cd``."""
    if not netns.startswith(f"{prefix}-"):
        return []
    middle, sep, _role = netns[len(prefix) + 1:].rpartition("-")
    if not sep or not middle:
        return []
    parts = middle.split("-")
    return ["-".join(parts[k:]) for k in range(len(parts))]


def _remove_run_pins(run_ids: Sequence[str]) -> None:
    """Pins a killed run's nodes left under /sys/fs/bpf/aggbox/<run>[-*] (e.g.
    ``<run>-agg``, ``<run>-h3``): deleting namespaces does not remove bpffs files, and
    a pinned map lives (kernel memory) until its pin goes."""
    from aggbox.bpf import remove_pins

    for run_id in sorted(set(run_ids)):
        remove_pins(run_id)


def down_all(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove every ``{prefix}-*`` namespace and the state files of runs under that
    prefix; returns the namespaces deleted."""
    require_root()
    validate_name("prefix", prefix, MAX_PREFIX_LEN)
    present = list_namespaces(prefix)
    run_ids = [r for ns in present for r in run_ids_of(ns, prefix)]
    deleted = _delete_namespaces(present)
    for path in state_dir().glob("*.json"):
        try:
            run_prefix = json.loads(path.read_text()).get("prefix", "")
        except (OSError, ValueError):
            run_prefix = prefix  # unreadable: nothing can use it any more
        if run_prefix == prefix or run_prefix.startswith(f"{prefix}-"):
            run_ids.append(path.stem)
            path.unlink(missing_ok=True)
    _remove_run_pins(run_ids)
    return deleted


def load_testbed(run_id: str) -> NetnsTestbed:
    """The live testbed ``run_id`` (brought up by another process), from its state file.
    It is not owned: this process exiting does not tear it down; ``down()`` does."""
    path = state_dir() / f"{run_id}.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise TestbedError(
            f"no testbed with run id {run_id!r} (no {path}); `aggbox testbed status` lists them"
        ) from None
    netem = Netem(**state["netem"]) if state.get("netem") else None
    tb = NetnsTestbed(state["hosts"], run_id=run_id, subnet=state["subnet"], netem=netem,
                      tx_offload=state["tx_offload"], prefix=state["prefix"],
                      mtu=state["mtu"], group_ips=state["group_ips"], persistent=True)
    missing = [ns for ns in tb.namespaces if not (NETNS_DIR / ns).exists()]
    if missing:
        raise TestbedError(
            f"testbed {run_id!r} is broken ({len(missing)} namespaces missing, e.g. "
            f"{missing[0]}): remove it with `aggbox testbed down --id {run_id}`"
        )
    tb.is_up, tb._claimed = True, True
    tb.netem_seed_applied = state.get("netem_seed_applied")
    return tb
