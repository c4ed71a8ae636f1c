"""Detach AggBox's eBPF programs, and only them, from one interface (teardown.yml runs this
on every host with the host's own Python; it needs only iproute2).

AggBox's programs are recognised by name: aggbox/bpf.py attaches each TC filter with its
entry point's name (TCA_BPF_NAME), and the kernel keeps the function's name as the
program's name, so a filter or XDP program counts as AggBox's when either name is in
--names. Every other filter, qdisc or XDP program on the interface is left alone; the
clsact qdisc goes only when AggBox's filters were the last ones on it. Prints one JSON
object: {"removed": [...], "kept": [...]}; with --check, removes nothing and says what
it would remove.
"""

from __future__ import annotations

import argparse
import json
import subprocess

# IFLA_XDP_ATTACHED_* -> the `ip link set ... <mode> off` keyword.
XDP_MODES = {1: "xdpdrv", 2: "xdpgeneric", 3: "xdpoffload"}


def run_json(argv: list[str]) -> list[dict]:
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def remove(argv: list[str], still_there) -> None:
    """Run a removal; a failure counts only if the thing is still there (a node that was
    stopping may have detached its own program between the listing and this call)."""
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0 and still_there():
        raise SystemExit(f"{' '.join(argv)}: {res.stderr.strip()}")


def prog_names(entry: dict) -> set[str]:
    """The names a filter or XDP entry of `tc -j`/`ip -j -d` carries (filter, program)."""
    names = {entry.get("bpf_name", ""), (entry.get("prog") or {}).get("name", "")}
    return names - {""}


def has_clsact(iface: str) -> bool:
    return any(q.get("kind") == "clsact"
               for q in run_json(["tc", "-j", "qdisc", "show", "dev", iface]))


def tc_filters(iface: str) -> list[tuple[str, dict]]:
    """(hook, filter) for every filter with options (the ones tc can name) on clsact."""
    found = []
    for hook in ("ingress", "egress"):
        for f in run_json(["tc", "-j", "filter", "show", "dev", iface, hook]):
            if "options" in f:
                found.append((hook, f))
    return found


def detach_tc(iface: str, names: set[str], check: bool, report: dict) -> None:
    if not has_clsact(iface):
        return
    filters = tc_filters(iface)
    ours = [(hook, f) for hook, f in filters
            if f.get("kind") == "bpf" and prog_names(f["options"]) & names]
    for hook, f in filters:
        if (hook, f) not in ours:
            report["kept"].append(f"tc {hook} {f.get('kind')} pref {f.get('pref')}")
    for hook, f in ours:
        label = "/".join(sorted(prog_names(f["options"])))
        report["removed"].append(f"tc {hook} bpf {label} pref {f['pref']}")
        if not check:
            remove(["tc", "filter", "del", "dev", iface, hook,
                    "protocol", f.get("protocol", "all"), "pref", str(f["pref"]),
                    "chain", str(f.get("chain", 0)), "handle", str(f["options"]["handle"]),
                    "bpf"],
                   lambda hook=hook, f=f: has_clsact(iface) and (hook, f) in tc_filters(iface))
    if ours and len(ours) == len(filters):
        report["removed"].append("tc clsact qdisc (no filters left on it)")
        if not check:
            remove(["tc", "qdisc", "del", "dev", iface, "clsact"], lambda: has_clsact(iface))


def xdp_programs(link: dict) -> list[tuple[int, dict]]:
    """(mode, prog) for each XDP program on the link (one, or several in multi mode)."""
    xdp = link.get("xdp") or {}
    attached = xdp.get("attached") or [xdp]
    return [(a.get("mode", 0), a["prog"]) for a in attached if a.get("prog")]


def detach_xdp(iface: str, names: set[str], check: bool, report: dict) -> None:
    links = run_json(["ip", "-j", "-d", "link", "show", "dev", iface])
    for mode, prog in xdp_programs(links[0] if links else {}):
        label = f"xdp {XDP_MODES.get(mode, mode)} {prog.get('name', '?')} id {prog.get('id')}"
        if not prog_names({"prog": prog}) & names or mode not in XDP_MODES:
            report["kept"].append(label)
            continue
        report["removed"].append(label)
        if not check:
            remove(["ip", "link", "set", "dev", iface, XDP_MODES[mode], "off"],
                   lambda prog=prog: prog["id"] in {p["id"] for _, p in xdp_programs(
                       run_json(["ip", "-j", "-d", "link", "show", "dev", iface])[0])})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iface", required=True)
    parser.add_argument("--names", required=True, help="comma-separated program names")
    parser.add_argument("--check", action="store_true", help="only say what would go")
    args = parser.parse_args(argv)
    names = {n.strip() for n in args.names.split(",") if n.strip()}
    report: dict[str, list[str]] = {"removed": [], "kept": []}
    detach_tc(args.iface, names, args.check, report)
    detach_xdp(args.iface, names, args.check, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
