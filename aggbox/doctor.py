"""``aggbox doctor``: can this machine run AggBox, and if not, what exactly to do.

Each check is one row (OK / WARN / FAIL / SKIP) with a concrete fix. Checks that need an
earlier one (root, BCC, headers) are skipped when it failed, so the first FAIL is the
one to fix. The attach checks use a throw-away network namespace, always removed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aggbox.bpf import VERIFIER_LIMIT, bpf_syscall

MIN_KERNEL = (5, 15)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 2, 4
TOOLS = {"clang": "clang", "bpftool": "bpftool", "ip": "iproute2", "tc": "iproute2",
         "ethtool": "ethtool", "nsenter": "util-linux"}
# Debian puts ip, tc and bpftool in sbin, which a non-root PATH often lacks.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

TRIAL_PROGRAM = """
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int abx_doctor_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int abx_doctor_tc(struct __sk_buff *skb) { return TC_ACT_OK; }
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    fix: str = ""
    severity: str = "error"  # "error", "warn" (does not fail doctor) or "skip"

    @property
    def status(self) -> str:
        if self.ok:
            return "OK"
        return {"warn": "WARN", "skip": "SKIP"}.get(self.severity, "FAIL")

    @property
    def passed(self) -> bool:
        """True when this row does not make the doctor fail."""
        return self.ok or self.severity == "warn"


@dataclass
class Context:
    """What earlier checks found, for the later checks that depend on it."""

    privileged: bool = False
    bcc: Any = None
    headers: bool = False
    bpf: Any = None  # the trial BCC object: keeps program fds alive until cleanup
    fds: dict[str, int] = field(default_factory=dict)


def skipped(name: str, why: str) -> Check:
    return Check(name, False, f"not tried: {why}", severity="skip")


# --- privileges and kernel -------------------------------------------------------------


def effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(ctx: Context) -> Check:
    caps = effective_caps()
    has = {name: bool(caps >> bit & 1) for name, bit in
           (("NET_ADMIN", CAP_NET_ADMIN), ("SYS_ADMIN", CAP_SYS_ADMIN), ("BPF", CAP_BPF))}
    ctx.privileged = has["NET_ADMIN"] and (has["BPF"] or has["SYS_ADMIN"])
    held = ", ".join(f"CAP_{n}" for n, v in has.items() if v) or "none of the needed ones"
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    return Check("privileges", ctx.privileged, f"{who}; capabilities: {held}",
                 fix="run as root: sudo .venv/bin/aggbox doctor (or grant CAP_NET_ADMIN "
                     "and CAP_BPF/CAP_SYS_ADMIN)")


def kernel_version(release: str) -> tuple[int, int]:
    major, minor = release.split("-")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_kernel(ctx: Context) -> Check:
    release = platform.release()
    ok = platform.system() == "Linux" and kernel_version(release) >= MIN_KERNEL
    want = ".".join(map(str, MIN_KERNEL))
    return Check("kernel version", ok, f"{platform.system()} {release} (need >= {want})",
                 fix=f"boot a Linux kernel >= {want} (Debian 12's 6.1 works)")


def check_btf(ctx: Context) -> Check:
    path = Path("/sys/kernel/btf/vmlinux")
    return Check("BTF", path.exists(), str(path) if path.exists() else f"{path} missing",
                 fix="use a kernel built with CONFIG_DEBUG_INFO_BTF=y (distribution kernels are)")


def bpf_map_create() -> None:
    """Create and close a 1-entry BPF array map: the smallest proof bpf(2) works."""
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4 B, value 4 B, 1
    os.close(bpf_syscall(0, attr))  # cmd 0 = BPF_MAP_CREATE


def check_bpf_syscall(ctx: Context) -> Check:
    try:
        bpf_map_create()
    except OSError as exc:
        return Check("bpf() syscall", False, f"creating a BPF map failed: {exc.strerror}",
                     fix="run as root; check kernel.unprivileged_bpf_disabled and seccomp "
                         "(containers need CAP_BPF or CAP_SYS_ADMIN)")
    return Check("bpf() syscall", True, "created a BPF array map")


def check_bpffs(ctx: Context) -> Check:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    ok = any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in mounts)
    return Check("bpffs", ok, "mounted at /sys/fs/bpf" if ok else "/sys/fs/bpf is not bpffs",
                 fix="mount -t bpf bpf /sys/fs/bpf", severity="warn")


# --- BCC and headers -------------------------------------------------------------------


def check_bcc(ctx: Context) -> Check:
    try:
        import bcc
    except ImportError as exc:
        return Check("BCC (python)", False, f"{sys.executable}: {exc}",
                     fix="sudo make setup (python3-bpfcc, seen by a .venv made from "
                         "/usr/bin/python3 with --system-site-packages)")
    ctx.bcc = bcc
    return Check("BCC (python)", True, f"bcc {getattr(bcc, '__version__', '?')}")


def check_headers(ctx: Context) -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    ctx.headers = (build / "include").is_dir()
    detail = str(build)
    if build.is_symlink():
        detail += f" -> {os.readlink(build)}"
    if not ctx.headers:
        detail += " (no headers there)"
    return Check("kernel headers", ctx.headers, detail, fix="sudo make setup")


@contextlib.contextmanager
def stderr_captured() -> Iterator[Callable[[], str]]:
    """BCC's compiler writes errors to fd 2 directly; keep them out of the table."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def compile_blocked(ctx: Context) -> str:
    """Why nothing can be compiled and loaded here (an earlier row's failure), or ""."""
    return ("needs root" if not ctx.privileged else "needs BCC" if ctx.bcc is None
            else "needs kernel headers" if not ctx.headers else "")


def check_trial_load(ctx: Context) -> list[Check]:
    names = ("BCC compile + load XDP", "BCC compile + load sched_cls")
    why = compile_blocked(ctx)
    if why:
        return [skipped(n, why) for n in names]
    bpf_cls = ctx.bcc.BPF
    start = time.monotonic()
    with stderr_captured() as captured:
        try:
            ctx.bpf = bpf_cls(text=TRIAL_PROGRAM)
        except Exception as exc:  # BCC raises plain Exception on compile errors
            detail = last_line(captured()) or str(exc)
            return [Check(n, False, f"compile failed: {detail}", fix="sudo make setup")
                    for n in names]
    took = f"compiled in {time.monotonic() - start:.1f} s"
    return [_load(ctx, names[0], "abx_doctor_xdp", bpf_cls.XDP, "xdp", took),
            _load(ctx, names[1], "abx_doctor_tc", bpf_cls.SCHED_CLS, "sched_cls", took)]


def _load(ctx: Context, name: str, func: str, prog_type: int, key: str, took: str) -> Check:
    with stderr_captured() as captured:
        try:
            ctx.fds[key] = ctx.bpf.load_func(func, prog_type).fd
        except Exception as exc:
            return Check(name, False, f"load failed: {last_line(captured()) or exc}",
                         fix="the verifier's last line is above; the kernel needs "
                             "CONFIG_BPF_SYSCALL and CONFIG_NET_CLS_BPF")
    return Check(name, True, f"{took}, loaded")


# --- attach in a throw-away namespace --------------------------------------------------

# Runs inside the namespace (under nsenter) with the program fds inherited: netlink finds
# the devices of the namespace the socket lives in, and the fds of the calling process.
# XDP goes through libbcc's bpf_attach_xdp, as ProgramFamily.attach_xdp does: pyroute2
# 0.7.2 encodes IFLA_XDP_FLAGS too short, which the kernel refuses with ERANGE ("attribute
# type 3 has an invalid length" in dmesg), so the row failed on kernels that attach fine.
ATTACH_HELPER = """
import json, os, sys
from bcc.libbcc import lib
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
xdp_fd, tc_fd, dev, native, generic = sys.argv[1:6]
xdp_fd, tc_fd = int(xdp_fd), int(tc_fd)
out = {"xdp": None, "xdp_errors": [], "tc": None}
for mode, flags in (("native", int(native)), ("generic", int(generic))):
    err = lib.bpf_attach_xdp(dev.encode(), xdp_fd, flags)
    if err == 0:
        out["xdp"] = mode
        break
    out["xdp_errors"].append(f"{mode}: {os.strerror(-err) if err < 0 else err}")
with IPRoute() as ipr:
    idx = ipr.link_lookup(ifname=dev)[0]
    try:
        ipr.tc("add", "clsact", idx)
        for parent in ("ffff:fff2", "ffff:fff3"):  # clsact ingress, egress
            ipr.tc("add-filter", "bpf", idx, ":1", fd=tc_fd, name="abx_doctor_tc",
                   parent=parent, classid=1, direct_action=True)
        out["tc"] = "ok"
    except NetlinkError as exc:
        out["tc"] = f"error: {exc}"
print(json.dumps(out))
"""


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    exe = find_tool(cmd[0]) or cmd[0]
    return subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30,
                          **kwargs)


@contextlib.contextmanager
def throwaway_netns() -> Iterator[str]:
    name = f"abx-doctor-{os.getpid()}"
    try:
        made = run(["ip", "netns", "add", name])
        if made.returncode != 0:
            raise RuntimeError(f"ip netns add: {made.stderr.strip()}")
        for cmd in (["link", "add", "abx0", "type", "veth", "peer", "name", "abx1"],
                    ["link", "set", "abx0", "up"], ["link", "set", "abx1", "up"]):
            step = run(["ip", "-n", name, *cmd])
            if step.returncode != 0:
                raise RuntimeError(f"ip {' '.join(cmd)}: {step.stderr.strip()}")
        yield name
    finally:
        run(["ip", "netns", "del", name])  # also removes the veth pair and programs


def attach_in_netns(ctx: Context) -> dict[str, Any]:
    fds = (ctx.fds["xdp"], ctx.fds["sched_cls"])
    with throwaway_netns() as ns:
        cmd = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", ATTACH_HELPER,
               str(fds[0]), str(fds[1]), "abx0", str(XDP_FLAGS_DRV_MODE),
               str(XDP_FLAGS_SKB_MODE)]
        done = run(cmd, pass_fds=fds)
        if done.returncode != 0:
            raise RuntimeError(last_line(done.stderr) or f"helper exited {done.returncode}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        # Trust the kernel's own view, not only the absence of errors.
        result["tc_seen"] = "abx_doctor_tc" in run(
            ["tc", "-n", ns, "filter", "show", "dev", "abx0", "egress"]).stdout
    return result


def check_attach(ctx: Context) -> list[Check]:
    names = ("XDP attach (veth)", "clsact + tc bpf attach")
    if not {"xdp", "sched_cls"} <= ctx.fds.keys():
        return [skipped(n, "needs the trial programs loaded") for n in names]
    if not all(find_tool(t) for t in ("ip", "tc", "nsenter")):
        return [skipped(n, "needs ip, tc and nsenter") for n in names]
    try:
        result = attach_in_netns(ctx)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return [Check(n, False, f"namespace test failed: {exc}",
                      fix="run as root; check `ip netns add x && ip netns del x`")
                for n in names]
    return [xdp_row(names[0], result), tc_row(names[1], result)]


def xdp_row(name: str, result: dict[str, Any]) -> Check:
    errors = "; ".join(result["xdp_errors"])
    if result["xdp"] == "native":
        return Check(name, True, "native XDP attached in a throw-away namespace")
    if result["xdp"] == "generic":
        return Check(name, False, f"only generic XDP ({errors})", severity="warn",
                     fix="AggBox runs with generic XDP, only slower; native XDP on veth "
                         "needs a kernel whose veth driver supports XDP")
    return Check(name, False, f"XDP attach refused: {errors}",
                 fix="check `dmesg`; the kernel needs XDP support in its veth driver")


def tc_row(name: str, result: dict[str, Any]) -> Check:
    ok = result["tc"] == "ok" and result["tc_seen"]
    detail = "clsact ingress + egress bpf filters attached" if ok else str(result["tc"])
    return Check(name, ok, detail,
                 fix="kernel needs CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS (clsact)")


# --- tools -----------------------------------------------------------------------------


def find_tool(tool: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(tool, path=path)


def check_tools(ctx: Context) -> Check:
    missing = [t for t in TOOLS if not find_tool(t)]
    if missing:
        pkgs = " ".join(sorted({TOOLS[t] for t in missing}))
        return Check("tools", False, f"missing: {', '.join(missing)}",
                     fix=f"sudo make setup (or apt-get install {pkgs})")
    return Check("tools", True, ", ".join(TOOLS))


def check_edge(ctx: Context) -> Check:
    """The allreduce edge's C loops (aggbox/native.py): without them numpy does the same,
    bit for bit, about twice as slowly."""
    from aggbox import native

    if native.library() is not None:
        return Check("edge", True, native.status())
    return Check("edge", False, native.status(), severity="warn",
                 fix="install a C compiler (sudo make setup installs clang); "
                     "AggBox's allreduce works without it, only slower")


def check_families(ctx: Context) -> list[Check]:
    """Every program AggBox loads, compiled and verified on this kernel: a program the
    verifier refuses here would otherwise fail an experiment halfway."""
    from aggbox.bpf import programs

    by_family: dict[str, list[tuple[str, str]]] = {}
    for family, fn, ctx_type in programs():
        by_family.setdefault(family, []).append((fn, ctx_type))
    why = compile_blocked(ctx)
    if why:
        return [skipped(f"bpf/{family}.c", why) for family in by_family]
    return [_check_family(ctx, family, fns) for family, fns in by_family.items()]


def _reason(text: str) -> str:
    """The line of a compiler's or verifier's output that says why: clang's last
    "error:", else the verifier's last line before its statistics."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    if errors:
        return errors[-1]
    said = [ln for ln in lines
            if not ln.startswith(("processed ", "verification time", "(run `aggbox doctor`"))]
    return said[-1] if said else text


def _check_family(ctx: Context, family: str, fns: list[tuple[str, str]]) -> Check:
    from aggbox.bpf import ProgramFamily

    name, start = f"bpf/{family}.c", time.monotonic()
    try:
        fam = ProgramFamily(family)
    except Exception as exc:  # VerifierError: clang's message
        return Check(name, False, f"did not compile: {_reason(str(exc))}",
                     fix="sudo make setup")
    took = time.monotonic() - start
    work: dict[str, int] = {}
    try:
        for fn, ctx_type in fns:
            fam.load_for(fn, ctx_type)
            work[fn] = fam.verified_insns(fn)
    except Exception as exc:  # VerifierError: the program, then the verifier's log
        return Check(name, False, f"{fn} refused: {_reason(str(exc))}",
                     fix="this kernel's verifier refuses it: see docs/kernel.md")
    finally:
        fam.close()
    most = max(work, key=lambda fn: work[fn])
    cost = (f"most verifier work: {most}, {work[most]:,} of {VERIFIER_LIMIT:,} instructions"
            if work[most] else "this kernel does not count the verifier's work (5.16+ does)")
    return Check(name, True, f"{len(work)} programs verified (compiled in {took:.1f} s); {cost}")


CHECKS: list[Callable[[Context], Check | list[Check]]] = [
    check_privileges, check_kernel, check_btf, check_bpf_syscall, check_bpffs,
    check_bcc, check_headers, check_tools, check_trial_load, check_attach, check_families,
    check_edge,
]


def run_checks() -> list[Check]:
    ctx = Context()
    rows: list[Check] = []
    try:
        for fn in CHECKS:
            rows.extend(_run_one(fn, ctx))
    finally:
        if ctx.bpf is not None:
            ctx.bpf.cleanup()
    return rows


def _run_one(fn: Callable[[Context], Check | list[Check]], ctx: Context) -> list[Check]:
    try:
        out = fn(ctx)
    except Exception as exc:  # a broken check is a finding, not a crash of the doctor
        name = fn.__name__.removeprefix("check_").replace("_", " ")
        return [Check(name, False, f"check crashed: {type(exc).__name__}: {exc}",
                      fix="report this with the output of `aggbox doctor`")]
    return out if isinstance(out, list) else [out]


def exit_code(checks: list[Check]) -> int:
    return 0 if all(c.passed for c in checks) else 1


# --- output ----------------------------------------------------------------------------

STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


def render_plain(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=5)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)


def render(checks: list[Check], file: Any = None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render_plain(checks), file=file or sys.stdout)
        return
    table = Table(title="aggbox doctor", show_lines=False)
    table.add_column("status")
    table.add_column("check")
    table.add_column("detail / fix", overflow="fold")  # paths must stay whole
    for c in checks:
        text = c.detail + (f"\n[yellow]fix:[/] {c.fix}" if not c.ok and c.fix else "")
        table.add_row(f"[{STYLE[c.status]}]{c.status}[/]", c.name, text)
    Console(file=file).print(table)


def summary(checks: list[Check]) -> str:
    failed = [c.name for c in checks if c.status == "FAIL"]
    if failed:
        return f"{len(failed)} check(s) failed: {', '.join(failed)}; apply the fixes above."
    warns = sum(c.status == "WARN" for c in checks)
    return "All checks passed" + (f" ({warns} warning(s))." if warns else ".")


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks()
    if args.json:
        print(json.dumps([asdict(c) | {"status": c.status} for c in checks], indent=2))
    else:
        render(checks)
        print(summary(checks))
    return exit_code(checks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor", help="check kernel features, privileges, BCC and headers",
        description="Check that this machine can run AggBox; every failure names its fix.",
        epilog="examples:\n  aggbox doctor\n  aggbox doctor --json")
    add_arguments(p)
    p.set_defaults(func=cmd_doctor)


def main(argv: list[str] | None = None) -> int:
    """`python -m aggbox.doctor`: works even when another subcommand cannot be imported."""
    parser = argparse.ArgumentParser(prog="python -m aggbox.doctor")
    add_arguments(parser)
    return cmd_doctor(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
