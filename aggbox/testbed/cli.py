"""``aggbox testbed up|status|down``: a netns testbed that outlives the command."""

from __future__ import annotations

import argparse
import time

from aggbox.errors import TestbedError
from aggbox.testbed.base import Netem
from aggbox.testbed.netns import (
    GROUP_MAC,
    NETNS_DIR,
    NetnsTestbed,
    default_prefix,
    down_all,
    down_run,
    list_namespaces,
    load_testbed,
    read_states,
)

__all__ = ["register", "load_testbed"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("testbed", help="bring a netns testbed up, list it, remove it",
                                   epilog="examples:\n  aggbox testbed up --hosts 3\n"
                                   "  aggbox testbed down --all")
    sub = parser.add_subparsers(dest="testbed_command", metavar="ACTION")
    sub.required = True

    up = sub.add_parser("up", help="create a testbed and leave it up",
                        epilog="examples:\n  aggbox testbed up --hosts 3\n"
                        "  aggbox testbed up --hosts 4 --id demo01 --loss 1 --delay 0.5")
    up.add_argument("--hosts", type=int, required=True, help="number of hosts")
    up.add_argument("--id", dest="run_id", help="run id (default: random 6 hex digits)")
    up.add_argument("--subnet", default="10.213.0.0/16", help="the hosts' addresses")
    up.add_argument("--mtu", type=int, default=1500, help="MTU of every link")
    up.add_argument("--group-ips", type=int, default=4, help="virtual group addresses")
    up.add_argument("--no-tx-offload", dest="tx_offload", action="store_false",
                    help="turn tx checksum offload off (wrong checksums are then dropped)")
    netem = up.add_argument_group("impairments per link (tc netem, both ends of each link)")
    netem.add_argument("--delay", type=float, default=0.0, metavar="MS", help="delay, ms")
    netem.add_argument("--jitter", type=float, default=0.0, metavar="MS", help="jitter, ms")
    netem.add_argument("--loss", type=float, default=0.0, metavar="PCT", help="loss, percent")
    netem.add_argument("--duplicate", type=float, default=0.0, metavar="PCT",
                       help="duplication, percent")
    netem.add_argument("--reorder", type=float, default=0.0, metavar="PCT",
                       help="reordering, percent")
    netem.add_argument("--seed", type=int, default=1, help="netem's random seed")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="list testbeds and their hosts",
                            epilog="examples:\n  aggbox testbed status\n"
                            "  aggbox testbed status --id demo01")
    status.add_argument("--id", dest="run_id",
                        help="show this run's hosts (default: list every testbed)")
    status.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="remove a testbed, or every leftover",
                          epilog="examples:\n  aggbox testbed down --id demo01\n"
                          "  aggbox testbed down --all")
    which = down.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="run_id", help="the run id of the testbed to remove "
                       "(default: none; give --id or --all)")
    which.add_argument("--all", action="store_true",
                       help=f"every '{default_prefix()}-*' namespace and state file")
    down.set_defaults(func=cmd_down)


def cmd_up(args: argparse.Namespace) -> int:
    netem = Netem(delay_ms=args.delay, jitter_ms=args.jitter, loss_pct=args.loss,
                  duplicate_pct=args.duplicate, reorder_pct=args.reorder, seed=args.seed)
    tb = NetnsTestbed(args.hosts, run_id=args.run_id, subnet=args.subnet, netem=netem,
                      tx_offload=args.tx_offload, mtu=args.mtu, group_ips=args.group_ips,
                      persistent=True)
    start = time.monotonic()
    tb.up()
    print(f"testbed {tb.run_id} up in {time.monotonic() - start:.2f} s: "
          f"{len(tb.hosts)} hosts on {tb.subnet}, mtu {tb.mtu}, "
          f"tx offload {'on' if tb.tx_offload else 'off'}")
    _print_netem(tb.describe())
    _print_hosts(tb)
    print(f"run on a host: nsenter --net={NETNS_DIR}/{tb.hosts[0].netns} -- COMMAND")
    print(f"remove it:     aggbox testbed down --id {tb.run_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.run_id:
        tb = load_testbed(args.run_id)
        _print_netem(tb.describe())
        _print_hosts(tb)
        return 0
    states = read_states()
    listed = {ns for s in states for ns in s.get("namespaces", [])}
    if not states:
        print("no testbeds")
    else:
        print(f"{'run id':16} {'hosts':>5}  {'subnet':18} {'present':>9}  impairment")
    for s in states:
        expected = s.get("namespaces", [])
        present = sum((NETNS_DIR / ns).exists() for ns in expected)
        print(f"{s['run_id']:16} {s.get('hosts', '?'):>5}  {s.get('subnet', '?'):18} "
              f"{present:>4}/{len(expected):<4}  {_netem_text(s.get('netem'))}")
    orphans = [ns for ns in list_namespaces(default_prefix()) if ns not in listed]
    if orphans:
        print(f"{len(orphans)} namespaces without a state file (`aggbox testbed down --all`):")
        print("  " + " ".join(orphans))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        deleted = down_all(default_prefix())
    else:
        deleted = down_run(args.run_id)
        if not deleted:
            raise TestbedError(f"nothing to remove for run id {args.run_id!r}")
    print(f"removed {len(deleted)} namespaces")
    return 0


def _print_hosts(tb: NetnsTestbed) -> None:
    print(f"{'host':6} {'namespace':24} {'ip':15} mac")
    for h in tb.hosts:
        print(f"{h.name:6} {h.netns:24} {h.ip:15} {h.mac}")
    print(f"group addresses ({GROUP_MAC}): {' '.join(tb.group_ips)}")


def _print_netem(desc: dict) -> None:
    if desc.get("netem"):
        seed = "" if desc.get("netem_seed_applied") is not False else " (seed not supported)"
        print(f"netem per link: {_netem_text(desc['netem'])}{seed}")


def _netem_text(netem: dict | None) -> str:
    if not netem:
        return "-"
    names = {"delay_ms": "delay {}ms", "jitter_ms": "jitter {}ms", "loss_pct": "loss {}%",
             "duplicate_pct": "dup {}%", "reorder_pct": "reorder {}%"}
    return " ".join(fmt.format(f"{netem[k]:g}") for k, fmt in names.items() if netem.get(k))
