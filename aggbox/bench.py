"""``aggbox bench <workload>``: one measurement point, every system side by side.

All systems run on the same testbed in one run, interleaved, after a warm-up. The human
output is a table; with ``--json`` the LAST line is one JSON object (the contract in
DESIGN.md section 7).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from aggbox.testbed import Netem, NetnsTestbed


def _stats(values: list[float]) -> dict[str, float]:
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return {"p50": math.nan, "p99": math.nan, "mean": math.nan, "n": 0}
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)),
            "mean": float(x.mean()), "n": int(x.size)}


def summarize_broadcast(samples: list[dict], systems: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for system in systems:
        rows = [s for s in samples if s["system"] == system]
        completion = _stats([r["completion_us"] for r in rows])
        delivery = _stats([r["delivery_us"] for r in rows])
        cpu = _stats([r["sender_cpu_us"] for r in rows])
        out[system] = {
            "completion_p50_us": round(completion["p50"], 1),
            "completion_p99_us": round(completion["p99"], 1),
            "completion_mean_us": round(completion["mean"], 1),
            "delivery_p50_us": round(delivery["p50"], 1),
            "delivery_p99_us": round(delivery["p99"], 1),
            "sender_cpu_us": round(cpu["p50"], 1),
            "n": completion["n"],
            "all_delivered": bool(rows) and all(r["delivered"] for r in rows),
        }
    return out


def _print_broadcast_table(result: dict) -> None:
    systems = result["systems"]
    print(f"broadcast: {result['hosts']} hosts (1 root + {result['hosts'] - 1} members), "
          f"{result['size']} B, receivers {result['receivers']}, loss {result['loss']}%")
    head = (f"{'system':<8} {'compl p50':>10} {'compl p99':>10} {'deliv p50':>10} "
            f"{'deliv p99':>10} {'cpu/send':>9} {'n':>5}  all delivered")
    print(head)
    print("-" * len(head))
    for name, s in systems.items():
        print(f"{name:<8} {s['completion_p50_us']:>8.1f}us {s['completion_p99_us']:>8.1f}us "
              f"{s['delivery_p50_us']:>8.1f}us {s['delivery_p99_us']:>8.1f}us "
              f"{s['sender_cpu_us']:>7.1f}us {s['n']:>5}  {s['all_delivered']}")
    for name, ratio in result.get("ratios", {}).items():
        print(f"{name}: {ratio:.3f}")


def bench_broadcast(args: argparse.Namespace) -> int:
    from aggbox.workloads.broadcast import run_broadcast

    systems = args.systems.split(",")
    params = {"size": args.size, "receivers": args.receivers, "gap_us": args.gap_us,
              "placement": args.placement}
    netem = Netem(loss_pct=args.loss, seed=args.seed)
    with NetnsTestbed(args.hosts, netem=None if netem.is_noop() else netem) as tb:
        run = run_broadcast(tb, params, systems, args.iters, args.warmup, args.seed)
    per_system = summarize_broadcast(run.samples, systems)
    result = {"workload": "broadcast", "hosts": args.hosts, "size": args.size,
              "receivers": args.receivers, "loss": args.loss, "iters": args.iters,
              "placement": args.placement,
              "systems": per_system}
    if "aggbox" in per_system:
        ratios = {}
        for base in systems:
            if base != "aggbox" and per_system[base]["completion_p50_us"] > 0:
                ratios[f"aggbox/{base} completion p50"] = round(
                    per_system["aggbox"]["completion_p50_us"]
                    / per_system[base]["completion_p50_us"], 4)
        result["ratios"] = ratios
    if args.counters:
        result["nodes"] = run.events
    _print_broadcast_table(result)
    if args.json:
        print(json.dumps(result))
    sys.stdout.flush()
    return 0 if all(s["all_delivered"] for s in per_system.values()) else 1


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="measure one point: AggBox vs its baselines")
    workloads = bench.add_subparsers(dest="workload", metavar="WORKLOAD")
    workloads.required = True

    b = workloads.add_parser("broadcast", help="broadcast latency, AggBox vs TCP and UDP")
    b.add_argument("--hosts", type=int, default=16, help="testbed hosts: 1 root + N-1 members")
    b.add_argument("--size", type=int, default=64, help="payload bytes per broadcast")
    b.add_argument("--iters", type=int, default=300, help="measured broadcasts per system")
    b.add_argument("--warmup", type=int, default=30, help="unmeasured broadcasts per system")
    b.add_argument("--receivers", choices=("idle", "busy"), default="idle")
    b.add_argument("--gap-us", type=int, default=2000,
                   help="pause between broadcasts, so each starts on a quiet system")
    b.add_argument("--placement", choices=("root-alone", "shared"), default="root-alone",
                   help="CPUs on this one machine: the root alone on CPU 0 (default) or "
                   "every host on every CPU")
    b.add_argument("--loss", type=float, default=0.0, help="loss on every link, percent")
    b.add_argument("--systems", default="aggbox,tcp,udp")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--counters", action="store_true", help="include node stats and counters")
    b.add_argument("--json", action="store_true", help="last line: one JSON object")
    b.set_defaults(func=bench_broadcast)
