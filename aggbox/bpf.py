"""Load, attach and detach AggBox's eBPF programs with BCC; read their maps.

One :class:`ProgramFamily` is one compiled ``bpf/<family>.c`` on one host: compile it
once per host and change behaviour through maps. It must be created by a process (or
thread) inside the host's network namespace, since attaching goes by interface name.

Two facts shape this file (docs/kernel.md, "Loading with BCC"):
- BCC rewrites ``map.lookup()`` only in the main source file, so a map call in an
  included header compiles into an indirect call the kernel refuses ("unknown opcode
  8d", BCC 0.26, kernel 6.18). We therefore inline the project's own ``#include "..."``
  files into one text before compiling, keeping ``#line`` markers for error messages.
- BCC 0.26 has no TC attach API: pyroute2 attaches TC programs (clsact + cls_bpf,
  direct action).

Attaching a family also reserves its UDP ports (its ``config`` map) from the ephemeral
range of the namespace (``net.ipv4.ip_local_reserved_ports``): AggBox's ports lie inside
Linux's default ephemeral range, and another program's ephemeral socket there would have
its datagrams inspected (the aggregator drops any without AggBox's magic).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import platform
import re
import struct
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aggbox import BPF_DIR
from aggbox.errors import SetupError, VerifierError
from aggbox.protocol import COUNTERS

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.M)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
TC_INGRESS_PARENT = "ffff:fff2"
TC_EGRESS_PARENT = "ffff:fff3"
PIN_ROOT = Path("/sys/fs/bpf/aggbox")
RESERVED_PORTS_SYSCTL = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
#: Extra ``NAME=VALUE`` defines for every family, comma-separated: for measurements only
#: (e.g. ``AGGBOX_NO_RX_CSUM=1``, docs/kernel.md "Cost of the checks").
DEFINES_ENV = "AGGBOX_BPF_DEFINES"


#: bpf(2) has no libc wrapper; its number depends on the architecture.
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
#: The verifier gives up on a program after this many processed instructions.
VERIFIER_LIMIT = 1_000_000
# bpf(BPF_OBJ_GET_INFO_BY_FD) on a program: struct bpf_prog_info up to attach_btf_id
# (232 bytes, kernel 5.16+), of which verified_insns at byte 216 (offsetof, uapi bpf.h).
_OBJ_GET_INFO_BY_FD = 15
_PROG_INFO_SIZE, _VERIFIED_INSNS_AT = 232, 216


def bpf_syscall(cmd: int, attr: ctypes.Array) -> int:
    """bpf(cmd, attr): its result (an fd, or 0); OSError with the errno on failure, or on
    an architecture whose syscall number is not in :data:`BPF_SYSCALL`."""
    nr = BPF_SYSCALL.get(platform.machine())
    if nr is None:
        raise OSError(0, f"unknown bpf(2) number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), ctypes.byref(attr),
                       ctypes.c_long(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def verified_insns(prog_fd: int) -> int:
    """How many instructions the verifier processed to accept the program (its
    ``verified_insns``; the verifier gives up at :data:`VERIFIER_LIMIT`)."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = ctypes.create_string_buffer(
        struct.pack("=IIQ", prog_fd, _PROG_INFO_SIZE, ctypes.addressof(info)), 16)
    bpf_syscall(_OBJ_GET_INFO_BY_FD, attr)
    return struct.unpack_from("=I", info, _VERIFIED_INSNS_AT)[0]


def inline_source(path: Path, root: Path = BPF_DIR, _seen: set[Path] | None = None) -> str:
    """``path`` with every ``#include "x.h"`` (relative to ``root``) replaced by its text."""
    seen = set() if _seen is None else _seen
    path = path.resolve()
    if path in seen:  # include guards would make it empty anyway
        return ""
    seen.add(path)
    out: list[str] = [f'#line 1 "{path}"']
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        match = _LOCAL_INCLUDE.match(line)
        if match:
            out.append(inline_source(root / match.group(1), root, seen))
            out.append(f'#line {lineno + 1} "{path}"')
        else:
            out.append(line)
    return "\n".join(out)


_PROGRAM = re.compile(r"^int (\w+)\(struct (__sk_buff|xdp_md) \*", re.M)


def programs() -> list[tuple[str, str, str]]:
    """``(family, program, context type)`` of every program in ``bpf/*.c``: each family's
    non-static functions taking a ``__sk_buff`` (TC) or an ``xdp_md`` (XDP)."""
    return [(source.stem, fn, ctx)
            for source in sorted(BPF_DIR.glob("*.c"))
            for fn, ctx in _PROGRAM.findall(inline_source(source))]


# While fd 2 is captured: (saved copy of the real stderr, the capture file). LLVM ends the
# process with exit(1) on some errors (e.g. "A call to built-in function 'memset' is not
# supported"), inside the capture: a C-level atexit hook then shows what was captured.
_capture: list[tuple[int, int]] = []


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _show_capture_at_exit(_arg) -> None:
    for saved, fd in _capture:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(saved, os.read(fd, 1 << 20))


_exit_hook_handle = ctypes.c_char(0)  # its address names our hook for __cxa_finalize


def _install_exit_hook() -> None:
    if not getattr(_install_exit_hook, "done", False):
        # atexit() itself is not an exported glibc symbol; __cxa_atexit is.
        libc = ctypes.CDLL(None)
        libc.__cxa_atexit(_show_capture_at_exit, None, ctypes.byref(_exit_hook_handle))
        # A normal exit finalizes Python before C's exit handlers run, and a ctypes
        # callback called after that crashes the process (SIGSEGV): run (and so remove)
        # the hook while Python is alive; only an exit from C (LLVM) still reaches it.
        atexit.register(libc.__cxa_finalize, ctypes.byref(_exit_hook_handle))
        _install_exit_hook.done = True


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture what libbcc prints on fd 2 (compiler and verifier messages)."""
    _install_exit_hook()
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        _capture.append((saved, tmp.fileno()))
        try:
            yield captured
        finally:
            _capture.pop()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class _TcAttachment:
    ifindex: int
    parent: str
    prio: int
    created_clsact: bool


class ProgramFamily:
    """One ``bpf/<family>.c`` compiled, loaded and attached on this host."""

    def __init__(self, family: str, defines: dict[str, int] | None = None, pin_tag: str = ""):
        from bcc import BPF  # imported here: the CLI and unit tests run without BCC

        self.family = family
        self._BPF = BPF
        # Interfaces are named by name (XDP) and index (TC) inside the network namespace
        # this family was created in: detaching from another one would hit the wrong
        # interface (e.g. the machine's own eth0), so detach goes back here (see detach).
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        source = BPF_DIR / f"{family}.c"
        if not source.exists():
            raise SetupError(f"no eBPF source {source}")
        cflags = ["-Wno-unused-function", "-Wno-compare-distinct-pointer-types"]
        cflags += [f"-D{k}={v}" for k, v in {**env_defines(), **(defines or {})}.items()]
        with _captured_stderr() as err:
            try:
                self.bpf = BPF(text=inline_source(source).encode(), cflags=cflags)
            except Exception as exc:
                compile_error = exc
            else:
                compile_error = None
        if compile_error is not None:
            os.close(self._netns_fd)
            raise VerifierError(
                f"bpf/{family}.c did not compile:\n{_tail(err[0])}\n"
                "(run `aggbox doctor` if this looks like missing kernel headers)"
            ) from compile_error
        self._loaded: dict[str, object] = {}
        self._xdp: list[tuple[str, int]] = []
        self._tc: list[_TcAttachment] = []
        self._pins: list[Path] = []
        self.pin_tag = pin_tag
        if pin_tag:
            self.pin_map("counters")

    # -- loading --------------------------------------------------------------------

    def load(self, fn: str, prog_type: int):
        """Load (once) and verify ``fn``; a refusal names the program and shows the log."""
        if fn in self._loaded:
            return self._loaded[fn]
        with _captured_stderr() as err:
            try:
                loaded = self.bpf.load_func(fn, prog_type)
            except Exception as exc:
                failure = exc
            else:
                failure = None
        if failure is not None:
            raise VerifierError(
                f"the kernel refused eBPF program {fn!r} of bpf/{self.family}.c: {failure}\n"
                f"verifier log (last lines):\n{_tail(err[0])}"
            ) from failure
        self._loaded[fn] = loaded
        return loaded

    def load_for(self, fn: str, ctx: str):
        """:meth:`load` ``fn`` as the program type its context says (the third field of
        :func:`programs`: ``xdp_md`` is XDP, ``__sk_buff`` TC)."""
        return self.load(fn, self._BPF.XDP if ctx == "xdp_md" else self._BPF.SCHED_CLS)

    def verified_insns(self, fn: str) -> int:
        """Instructions the verifier processed for ``fn``, once :meth:`load` loaded it
        (0 on kernels before 5.16, which do not count them)."""
        if fn not in self._loaded:
            raise SetupError(f"eBPF program {fn!r} of bpf/{self.family}.c is not loaded")
        return verified_insns(self._loaded[fn].fd)

    # -- attaching ------------------------------------------------------------------

    def attach_xdp(self, ifname: str, fn: str, mode: str = "auto") -> str:
        """Attach ``fn`` as XDP on ``ifname``; native mode first when ``mode`` is auto.
        Returns the mode that took."""
        prog = self.load(fn, self._BPF.XDP)
        modes = {"native": [XDP_FLAGS_DRV_MODE], "generic": [XDP_FLAGS_SKB_MODE]}
        tries = modes.get(mode, [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE])
        last: Exception | None = None
        for flags in tries:
            with _captured_stderr():
                try:
                    self._BPF.attach_xdp(ifname, prog, flags)
                except Exception as exc:
                    last = exc
                    continue
            self._xdp.append((ifname, flags))
            return "native" if flags == XDP_FLAGS_DRV_MODE else "generic"
        raise SetupError(f"cannot attach XDP program {fn!r} to {ifname}: {last}")

    def attach_tc(self, ifname: str, fn: str, direction: str, prio: int = 1) -> None:
        """Attach ``fn`` as a direct-action cls_bpf filter on ``ifname``'s clsact hook."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        prog = self.load(fn, self._BPF.SCHED_CLS)
        parent = TC_INGRESS_PARENT if direction == "ingress" else TC_EGRESS_PARENT
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=ifname)
            if not links:
                raise SetupError(f"no interface {ifname!r} in this network namespace")
            ifindex = links[0]
            created = False
            try:
                ipr.tc("add", "clsact", ifindex)
                created = True
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: another family's programs share the hook
                    raise
            filter_args = dict(fd=prog.fd, name=fn, parent=parent, prio=prio, classid=1,
                               direct_action=True)
            try:
                ipr.tc("add-filter", "bpf", ifindex, ":1", **filter_args)
            except NetlinkError as exc:
                if exc.code != 17:
                    raise
                # A process that died without detaching left its filter at our priority:
                # ours replaces it (one owner per family and host).
                ipr.tc("del-filter", "bpf", ifindex, ":1", parent=parent, prio=prio)
                ipr.tc("add-filter", "bpf", ifindex, ":1", **filter_args)
        self._tc.append(_TcAttachment(ifindex, parent, prio, created))
        self._reserve_configured_ports()

    def _reserve_configured_ports(self) -> None:
        """Reserve the ports the family's ``config`` map names, if it has one."""
        try:
            table = self.bpf["config"]
        except KeyError:
            return
        leaf = table[table.Key(0)]
        if getattr(leaf, "port_lo", 0) and leaf.port_hi >= leaf.port_lo:
            reserve_ports(leaf.port_lo, leaf.port_hi)

    def detach(self) -> None:
        """Detach everything this family attached and unpin its maps. Idempotent; from
        any thread or namespace (the work is done in the family's own namespace)."""
        if self._netns_fd < 0 or _same_netns(self._netns_fd):
            self._detach_here()
            return
        errors: list[BaseException] = []

        def in_family_netns() -> None:
            try:
                if ctypes.CDLL(None, use_errno=True).setns(self._netns_fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into the family's namespace")
                self._detach_here()
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        worker = threading.Thread(target=in_family_netns, name=f"detach-{self.family}")
        worker.start()
        worker.join()
        if errors:
            raise errors[0]

    def _detach_here(self) -> None:
        """Detach everything this family attached and unpin its maps. Idempotent."""
        for ifname, flags in self._xdp:
            with contextlib.suppress(Exception), _captured_stderr():
                self._BPF.remove_xdp(ifname, flags)
        self._xdp.clear()
        self._detach_tc()
        for pin in self._pins:
            with contextlib.suppress(OSError):
                pin.unlink()
            with contextlib.suppress(OSError):
                pin.parent.rmdir()
        self._pins.clear()

    def _detach_tc(self) -> None:
        if not self._tc:
            return
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for att in self._tc:
                with contextlib.suppress(Exception):
                    ipr.tc("del-filter", "bpf", att.ifindex, ":1", parent=att.parent,
                           prio=att.prio)
            for att in self._tc:
                if att.created_clsact:
                    with contextlib.suppress(Exception):
                        ipr.tc("del", "clsact", att.ifindex)
        self._tc.clear()

    def close(self) -> None:
        self.detach()
        with contextlib.suppress(Exception):
            self.bpf.cleanup()
        if self._netns_fd >= 0:
            os.close(self._netns_fd)
            self._netns_fd = -1

    def __enter__(self) -> ProgramFamily:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- maps -----------------------------------------------------------------------

    def __getitem__(self, name: str):
        return self.bpf[name]

    def discard(self, name: str, key: int) -> None:
        """Delete ``key`` from hash map ``name`` if it is there (removing a job)."""
        table = self.bpf[name]
        with contextlib.suppress(KeyError):
            del table[table.Key(key)]

    def counters(self) -> dict[str, int]:
        """The per-CPU counters map, summed over CPUs, by name."""
        table = self.bpf["counters"]
        return {name: int(sum(table[table.Key(i)])) for i, name in enumerate(COUNTERS)}

    def pin_map(self, name: str) -> Path:
        """Pin a map under /sys/fs/bpf/aggbox/<pin_tag>/<family>_<name> for `aggbox stats`."""
        from bcc import libbcc

        ensure_bpffs()
        path = pin_path(self.pin_tag, self.family, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            path.unlink()  # a crashed run's pin
        fd = self.bpf[name].map_fd
        if libbcc.lib.bpf_obj_pin(fd, ctypes.c_char_p(str(path).encode())) != 0:
            raise SetupError(f"cannot pin map {name} at {path}: is bpffs mounted at /sys/fs/bpf?")
        self._pins.append(path)
        return path


def env_defines() -> dict[str, str]:
    """The defines :data:`DEFINES_ENV` names (``A=1,B=2``)."""
    text = os.environ.get(DEFINES_ENV, "")
    pairs = (item.partition("=") for item in text.split(",") if item.strip())
    return {k.strip(): (v.strip() or "1") for k, _, v in pairs}


def reserve_ports(lo: int, hi: int) -> bool:
    """Add ``lo..hi`` to the calling thread's namespace's reserved ports (kept by the
    kernel out of ephemeral allocation; explicit binds still work). Idempotent; the
    reservation outlives the programs (a testbed namespace takes it along). Where
    /proc/sys is read-only (a non-privileged container: the docker testbed reserves from
    outside) and the ports are not reserved yet, warns and returns False."""
    try:
        current = RESERVED_PORTS_SYSCTL.read_text().strip()
    except OSError:
        return False  # no such sysctl here: nothing to keep out
    wanted = f"{lo}-{hi}" if hi > lo else str(lo)
    if _covers(current, lo, hi):
        return True
    try:
        RESERVED_PORTS_SYSCTL.write_text(",".join(filter(None, [current, wanted])))
    except OSError as exc:
        warnings.warn(f"cannot reserve UDP ports {wanted} from ephemeral use "
                      f"({RESERVED_PORTS_SYSCTL}: {exc.strerror}): another program's "
                      "ephemeral socket may land on an AggBox port", stacklevel=2)
        return False
    return True


def _covers(ranges: str, lo: int, hi: int) -> bool:
    """Does the sysctl's list (``a-b,c,...``) hold every port of lo..hi?"""
    held: set[int] = set()
    for part in filter(None, ranges.split(",")):
        first, _, last = part.partition("-")
        held.update(range(int(first), int(last or first) + 1))
    return all(p in held for p in range(lo, hi + 1))


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf if it is not (some machines boot without it)."""
    if os.path.ismount("/sys/fs/bpf"):
        return
    import subprocess

    proc = subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SetupError(f"bpffs is not mounted and mounting it failed: {proc.stderr.strip()}; "
                         "run `mount -t bpf bpf /sys/fs/bpf` as root")


CLONE_NEWNET = 0x40000000


def _same_netns(fd: int) -> bool:
    """Is the calling thread in the network namespace that ``fd`` refers to?"""
    return os.fstat(fd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino


def pin_path(tag: str, family: str, name: str) -> Path:
    return PIN_ROOT / tag / f"{family}_{name}"


def remove_pins(tag: str) -> list[Path]:
    """Remove the pins under ``tag`` and ``tag-*`` (e.g. a testbed's ``<run>-h3``) that a
    process killed before it could unpin left on bpffs; returns the folders removed."""
    removed: list[Path] = []
    if not tag:
        return removed
    with contextlib.suppress(OSError):  # no bpffs, or not root: nothing of ours there
        for folder in sorted({*PIN_ROOT.glob(f"{tag}-*"), PIN_ROOT / tag}):
            if not folder.is_dir():
                continue
            for pin in folder.iterdir():
                with contextlib.suppress(OSError):
                    pin.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()
                removed.append(folder)
    return removed
