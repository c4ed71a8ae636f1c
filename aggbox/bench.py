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


def parse_sizes(text: str) -> list[int]:
    """'262144', '1Ki,4Ki' or a doubling range '1Ki:64Mi' (floats, not bytes)."""
    def one(tok: str) -> int:
        units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
        for suffix, mult in units.items():
            if tok.endswith(suffix):
                return int(float(tok[: -len(suffix)]) * mult)
        return int(tok)

    if ":" in text:
        lo, hi = (one(t) for t in text.split(":"))
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= 2
        return sizes
    return [one(t) for t in text.split(",")]


def summarize_allreduce(samples: list[dict], systems: list[str], floats: int) -> dict:
    out: dict[str, dict] = {}
    for system in systems:
        rows = [s for s in samples if s["system"] == system]
        t = _stats([r["time_ms"] for r in rows])
        entry = {"p50_ms": round(t["p50"], 3), "p99_ms": round(t["p99"], 3),
                 "algbw_gbps": round(floats * 4 / (t["p50"] * 1e6), 4) if t["n"] else None,
                 "max_abs_err": max((r["max_abs_err"] for r in rows), default=None),
                 "n": t["n"]}
        if system == "aggbox":
            entry["err_bound"] = max((r["err_bound"] for r in rows), default=None)
            entry["within_bound"] = all(r["within_bound"] for r in rows)
        out[system] = entry
    return out


def _print_allreduce_table(results: list[dict]) -> None:
    print(f"{'size':>10} {'count':>10} {'type':>6} {'system':>8} {'time p50':>11} "
          f"{'time p99':>11} {'algbw':>10} {'max err':>10} {'bound':>10}")
    for res in results:
        for name, s in res["systems"].items():
            bound = f"{s['err_bound']:.2e}" if s.get("err_bound") is not None else "-"
            print(f"{res['floats'] * 4:>10} {res['floats']:>10} {'float':>6} {name:>8} "
                  f"{s['p50_ms']:>9.3f}ms {s['p99_ms']:>9.3f}ms {s['algbw_gbps'] or 0:>7.3f}GB/s"
                  f" {s['max_abs_err']:>10.2e} {bound:>10}")
        if "ratios" in res:
            for name, ratio in res["ratios"].items():
                print(f"{'':>10} {name}: {ratio:.3f}")


def bench_allreduce(args: argparse.Namespace) -> int:
    from aggbox.workloads.allreduce import run_allreduce

    systems = args.systems.split(",")
    netem = Netem(loss_pct=args.loss, seed=args.seed)
    results = []
    with NetnsTestbed(args.workers + 1, mtu=args.mtu,
                      netem=None if netem.is_noop() else netem) as tb:
        for floats in parse_sizes(args.floats):
            params = {"floats": floats, "block": args.block,
                      "distribution": args.distribution}
            run = run_allreduce(tb, params, systems, args.iters, args.warmup, args.seed)
            res = {"workload": "allreduce", "workers": args.workers, "floats": floats,
                   "mtu": args.mtu, "loss": args.loss,
                   "systems": summarize_allreduce(run.samples, systems, floats)}
            if "aggbox" in res["systems"]:
                agg = res["systems"]["aggbox"]["p50_ms"]
                res["ratios"] = {f"aggbox/{b} p50": round(agg / s["p50_ms"], 4)
                                 for b, s in res["systems"].items()
                                 if b != "aggbox" and s["p50_ms"]}
            if args.counters:
                res["nodes"] = run.events
            results.append(res)
    _print_allreduce_table(results)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"workload": "allreduce",
                                                               "sweep": results}))
    sys.stdout.flush()
    ok = all(s.get("within_bound", True) for r in results for s in r["systems"].values())
    return 0 if ok else 1


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

    a = workloads.add_parser("allreduce", help="float32 allreduce, AggBox vs gloo and TCP PS")
    a.add_argument("--workers", type=int, default=8)
    a.add_argument("--floats", default="262144",
                   help="floats per tensor: N, a list N,M or a doubling range 1Ki:64Mi")
    a.add_argument("--iters", type=int, default=20, help="measured calls per system")
    a.add_argument("--warmup", type=int, default=5)
    a.add_argument("--block", type=int, default=0,
                   help="int32 values per packet (0: the largest the MTU allows)")
    a.add_argument("--mtu", type=int, default=9000, help="testbed MTU (all systems)")
    a.add_argument("--distribution", default="gaussian",
                   choices=("gaussian", "uniform", "heavy", "zeros"))
    a.add_argument("--loss", type=float, default=0.0, help="loss on every link, percent")
    a.add_argument("--systems", default="aggbox,gloo,tcp_ps")
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--counters", action="store_true")
    a.add_argument("--json", action="store_true", help="last line: one JSON object")
    a.set_defaults(func=bench_allreduce)
