"""Seeded loss / burst loss / duplication / reordering on testbed links, with bpf/impair.c.

This kernel has no sch_netem (see bpf/impair.c), so impairments are an eBPF program on
both TC hooks of each host's switch-side veth. ``apply_impairment`` runs this module as a
short-lived process inside the switch namespace: it compiles, attaches and exits; the
attached filters keep the program and its maps alive until the links are deleted.

    python -m aggbox.testbed.impair --links h0,h1 --loss 5 --duplicate 5 --reorder 5 --seed 7
    python -m aggbox.testbed.impair --links h0,h1 --burst-loss 1,10,70

Burst loss is a Gilbert-Elliott model per link and direction, given as three percentages
``enter,leave,loss``: per packet a good link turns bad with ``enter``, a bad one turns
good with ``leave``, and a packet on a bad link is lost with ``loss`` (1,10,70: bursts of
~10 packets, ~6.4% of packets lost per link). ``Netem(burst_enter_pct=, burst_leave_pct=,
burst_loss_pct=)`` carries it; :func:`parse_burst_loss` reads the CLI form.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys

from aggbox.errors import TestbedError

PPM = 1_000_000


def _percent_to_ppm(pct: float) -> int:
    if not 0 <= pct <= 100:
        raise TestbedError(f"an impairment percentage must be within 0..100, got {pct}")
    return round(pct * PPM / 100)


# TCP ports never impaired: the workloads' untimed control channels (broadcast's
# "delivered" reports, allreduce's and mapreduce's barriers; tests/unit/test_burst_loss.py
# checks they match). At 20% loss a control message stalled the harness for 10+ s in TCP's
# RTO back-off, and the cell failed for the harness's sake, not the collective's.
EXEMPT_TCP_PORTS = (44100, 46500, 49999)

BURST_DEFAULT = (1.0, 10.0, 70.0)  # the example: 1% enter, 10% leave, 70% loss


def parse_burst_loss(text: str) -> tuple[float, float, float]:
    """``"enter,leave,loss"`` (percent each) -> a tuple; ``""`` or ``"0"`` -> no burst loss,
    ``"default"`` -> :data:`BURST_DEFAULT`."""
    text = text.strip()
    if text in ("", "0", "off"):
        return (0.0, 0.0, 0.0)
    if text == "default":
        return BURST_DEFAULT
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise TestbedError(f"burst loss is 'enter,leave,loss' in percent (e.g. 1,10,70), "
                           f"got {text!r}")
    for pct in parts:
        _percent_to_ppm(pct)  # refuses values outside 0..100
    if parts[0] and not parts[1]:
        raise TestbedError("burst loss with leave 0 never leaves the bad state: a dead link")
    return parts  # type: ignore[return-value]


def burst_text(burst: tuple[float, float, float]) -> str:
    """The inverse of :func:`parse_burst_loss` (what the command line takes)."""
    return ",".join(f"{x:g}" for x in burst)


def _clear(links: list[str]) -> None:
    """Remove earlier impairment filters (the clsact qdisc carries them)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in links:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                with contextlib.suppress(Exception):
                    ipr.tc("del", "clsact", idx[0])


def _attach(links: list[str], loss: float, duplicate: float, reorder: float, seed: int,
            burst: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
    from pyroute2 import IPRoute

    from aggbox.bpf import ProgramFamily

    family = ProgramFamily("impair")
    cfg = family["impair_config"]
    value = cfg.Leaf()
    value.loss_ppm = _percent_to_ppm(loss)
    value.duplicate_ppm = _percent_to_ppm(duplicate)
    value.reorder_ppm = _percent_to_ppm(reorder)
    if burst[0] and burst[2]:
        value.burst_enter_ppm = _percent_to_ppm(burst[0])
        value.burst_leave_ppm = _percent_to_ppm(burst[1])
        value.burst_loss_ppm = _percent_to_ppm(burst[2])
    value.seed = seed
    for i, port in enumerate(EXEMPT_TCP_PORTS):
        value.exempt_tcp[i] = port
    cfg[cfg.Key(0)] = value
    states = family["links"]
    with IPRoute() as ipr:
        for name in links:
            ifindex = ipr.link_lookup(ifname=name)[0]
            for direction in (0, 1):
                st = states.Leaf()
                # xorshift must not start at 0; mix seed, link and direction.
                st.rng = (seed * 0x9E3779B97F4A7C15 + ifindex * 2 + direction + 1) % (1 << 64) or 1
                states[states.Key(ifindex * 2 + direction)] = st
            family.attach_tc(name, "impair_ingress", "ingress")
            family.attach_tc(name, "impair_egress", "egress")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--links", required=True, help="comma-separated interface names")
    parser.add_argument("--loss", type=float, default=0.0, help="percent")
    parser.add_argument("--duplicate", type=float, default=0.0, help="percent")
    parser.add_argument("--reorder", type=float, default=0.0, help="percent")
    parser.add_argument("--burst-loss", default="", metavar="ENTER,LEAVE,LOSS",
                        help="Gilbert-Elliott burst loss, percent each (e.g. 1,10,70)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    links = [name for name in args.links.split(",") if name]
    burst = parse_burst_loss(args.burst_loss)
    _clear(links)
    if args.loss or args.duplicate or args.reorder or (burst[0] and burst[2]):
        _attach(links, args.loss, args.duplicate, args.reorder, args.seed, burst)
    return 0


def apply_impairment(switch_netns: str, links: list[str], loss: float = 0.0,
                     duplicate: float = 0.0, reorder: float = 0.0, seed: int = 1,
                     burst: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
    """Impair (or, with all zero, clear) ``links`` inside ``switch_netns``. ``burst`` is
    Gilbert-Elliott burst loss, ``(enter, leave, loss)`` in percent."""
    argv = ["nsenter", f"--net=/run/netns/{switch_netns}", "--", sys.executable, "-m",
            "aggbox.testbed.impair", "--links", ",".join(links), "--loss", str(loss),
            "--duplicate", str(duplicate), "--reorder", str(reorder), "--seed", str(seed),
            "--burst-loss", burst_text(burst)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise TestbedError(f"could not impair links in {switch_netns}: {tail}")


#: enum impair_counter of bpf/impair.c, in order
IMPAIR_COUNTERS = ("lost", "duplicated", "held", "released", "burst_lost", "bursts",
                   "bad_seen")


def read_counters(switch_netns: str, link: str) -> dict[str, int]:
    """What bpf/impair.c did on this testbed so far: its per-CPU counters, summed (every
    link of a testbed shares one program family). {} when no impairment is attached.

    The programs outlive the short-lived process that attached them, so the counters are
    read through bpftool: the filter on ``link`` names the program, the program its maps."""
    def run(*argv: str) -> object:
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{switch_netns}", "--", *argv],
                              capture_output=True, text=True)
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []

    filters = run("tc", "-j", "filter", "show", "dev", link, "ingress")
    prog_ids = [f["options"]["prog"]["id"] for f in filters if isinstance(f, dict)
                and f.get("kind") == "bpf" and "impair" in str(f.get("options", {}))]
    for prog_id in prog_ids:
        prog = run("bpftool", "-j", "prog", "show", "id", str(prog_id))
        for map_id in (prog.get("map_ids", []) if isinstance(prog, dict) else []):
            info = run("bpftool", "-j", "map", "show", "id", str(map_id))
            if isinstance(info, dict) and info.get("name", "").startswith("impair_counte"):
                return _sum_percpu(run("bpftool", "-j", "map", "dump", "id", str(map_id)))
    return {}


def _sum_percpu(entries: object) -> dict[str, int]:
    out = {}
    for e in entries if isinstance(entries, list) else []:
        key = e.get("key")
        key = int(key) if isinstance(key, int) else int.from_bytes(
            bytes(int(b, 16) for b in key), "little")
        total = sum(_as_int(v.get("value")) for v in e.get("values", []))
        if key < len(IMPAIR_COUNTERS) and total:
            out[IMPAIR_COUNTERS[key]] = total
    return out


def _as_int(value: object) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, list):  # raw bytes as hex strings
        return int.from_bytes(bytes(int(b, 16) for b in value), "little")
    return 0


if __name__ == "__main__":
    # os._exit: skip BCC's atexit clean-up; the attached filters must outlive this process.
    import os

    code = main()
    sys.stdout.flush()
    os._exit(code)
