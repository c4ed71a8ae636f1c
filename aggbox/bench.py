"""``aggbox bench <workload>``: one measurement point, every system side by side.

All systems run on the same testbed in one run, interleaved, after a warm-up. The human
output is a table; with ``--json`` the LAST line is one JSON object (docs/design.md,
"From experiment file to figure").
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


BROADCAST_P99_MIN_N = 100  # a p99 of fewer samples is one or two values: not reported


def _num(value, digits: int = 1) -> float | None:
    """JSON-safe: NaN and None become null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


def _ci(values: list[float]) -> list[float | None]:
    from aggbox.results import bootstrap_median_ci

    lo, hi = bootstrap_median_ci(values)
    return [_num(lo), _num(hi)]


def _cell(value, width: int, spec: str = ".1f", scale: float = 1.0) -> str:
    """A table cell: ``value`` (times ``scale``) right-aligned in ``width``, "-" if None."""
    if value is None:
        return f"{'-':>{width}}"
    return f"{value if scale == 1.0 else value * scale:>{width}{spec}}"


def _ci_cell(ci, spec: str) -> str:
    """A bootstrap CI as "[lo, hi]", "-" where either end is unknown."""
    lo, hi = ci or (None, None)
    return f"[{lo:{spec}}, {hi:{spec}}]" if lo is not None and hi is not None else "-"


def _procs_per_cpu_cell(entry: dict) -> str:
    """Processes a call needs per CPU, "!" when that overcommits the CPUs."""
    ppc = entry.get("procs_per_cpu")
    return "-" if ppc is None else f"{ppc:g}" + ("!" if entry.get("overcommitted") else "")


def _emit(result: dict, print_table, as_json: bool) -> None:
    """The table, then (``--json``) the result as the output's last line."""
    print_table(result)
    if as_json:
        print(json.dumps(result))
    sys.stdout.flush()


def _print_head(head: str) -> None:
    print(head)
    print("-" * len(head))


def summarize_broadcast(samples: list[dict], systems: list[str]) -> dict[str, dict]:
    """Per system: completion and delivery p50 (with a bootstrap 95% CI of the median)
    and p99 (only where n >= 100), the CPU per broadcast (whole machine and per role), the
    promise and the concurrency; all_delivered only if every member got every message."""
    out: dict[str, dict] = {}
    for system in systems:
        rows = [s for s in samples if s["system"] == system]
        first = rows[0] if rows else {}
        entry: dict = {"promise": first.get("promise")}
        for metric in ("completion", "delivery"):
            values = [r[f"{metric}_us"] for r in rows]
            st = _stats(values)
            entry[f"{metric}_p50_us"] = _num(st["p50"])
            entry[f"{metric}_p50_ci"] = _ci([v for v in values if v is not None])
            entry[f"{metric}_p99_us"] = (_num(st["p99"]) if st["n"] >= BROADCAST_P99_MIN_N
                                         else None)
            entry[f"{metric}_mean_us"] = _num(st["mean"])
        entry["sender_cpu_us"] = _num(_stats([r["sender_cpu_us"] for r in rows])["p50"])
        for col in ("cpu_us_per_op", "root_cpu_us_per_op", "members_cpu_us_per_op"):
            entry[col] = _num(first.get(col))
        entry["procs_per_cpu"] = first.get("procs_per_cpu")
        entry["overcommitted"] = first.get("overcommitted")
        entry["cpu_source"] = first.get("cpu_source")
        entry["n"] = len(rows)
        entry["all_delivered"] = bool(rows) and all(r["delivered"] for r in rows)
        out[system] = entry
    return out


def broadcast_ratios(samples: list[dict], per_system: dict[str, dict],
                     receivers: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """AggBox's completion and delivery p50 over every baseline's, each with a bootstrap
    95% CI and both promises named; and the headlines: the same-promise comparison
    (tcp_kack) and, for busy receivers, the paper's (tcp)."""
    from aggbox.results import bootstrap_ratio_ci

    if "aggbox" not in per_system:
        return {}, {}

    def values(system: str, metric: str) -> list[float]:
        return [s[metric] for s in samples if s["system"] == system and s[metric] is not None]

    ratios: dict[str, dict] = {}
    for metric in ("completion", "delivery"):
        ours = values("aggbox", f"{metric}_us")
        for base, entry in per_system.items():
            if base == "aggbox":
                continue
            ratio, lo, hi = bootstrap_ratio_ci(ours, values(base, f"{metric}_us"))
            ratios[f"aggbox/{base} {metric} p50"] = {
                "ratio": _num(ratio, 4), "ci": [_num(lo, 4), _num(hi, 4)],
                "promises": f"{per_system['aggbox']['promise']} vs {entry['promise']}"}
    headline = {}
    wanted = ["aggbox/tcp_kack completion p50"]
    if receivers == "busy":
        wanted.append("aggbox/tcp completion p50")
    for name in wanted:
        if name in ratios:
            headline[name] = ratios[name]
    return ratios, headline


def _print_broadcast_table(result: dict) -> None:
    systems = result["systems"]
    print(f"broadcast: {result['hosts']} hosts (1 root + {result['hosts'] - 1} members), "
          f"{result['size']} B, receivers {result['receivers']}, loss {result['loss']}%, "
          f"placement {result['placement']}")

    head = (f"{'system':<8} {'promise':<7} {'compl50':>8} {'compl99':>8} {'deliv50':>8} "
            f"{'deliv99':>8} {'cpu/op':>7} {'root':>6} {'members':>7} {'p/cpu':>5} "
            f"{'over':>4} {'n':>4} {'ok':>3}")
    _print_head(head)
    for name, s in systems.items():
        ppc = f"{s['procs_per_cpu']:>5.1f}" if s["procs_per_cpu"] is not None else f"{'-':>5}"
        print(f"{name:<8} {s['promise'] or '-':<7} {_cell(s['completion_p50_us'], 8)} "
              f"{_cell(s['completion_p99_us'], 8)} {_cell(s['delivery_p50_us'], 8)} "
              f"{_cell(s['delivery_p99_us'], 8)} {_cell(s['cpu_us_per_op'], 7)} "
              f"{_cell(s['root_cpu_us_per_op'], 6)} {_cell(s['members_cpu_us_per_op'], 7)} {ppc} "
              f"{'yes' if s['overcommitted'] else 'no':>4} {s['n']:>4} "
              f"{'yes' if s['all_delivered'] else 'NO':>3}")
    print("us; cpu/op, root, members: CPU per broadcast; over: the processes a completion "
          "waits for\noutnumber their CPUs (p/cpu); p99 only from 100 samples")
    for name, r in result.get("ratios", {}).items():
        star = "  <- headline" if name in result.get("headline", {}) else ""
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        lo, hi = (f"{v:.3f}" if v is not None else "?" for v in r["ci"])
        print(f"{name}: {ratio} [{lo}, {hi}] ({r['promises']}){star}")


def _netem(args: argparse.Namespace, **extra: float) -> Netem:
    """The links' impairment from --loss, --burst-loss and --seed."""
    from aggbox.testbed.impair import parse_burst_loss

    enter, leave, loss = parse_burst_loss(args.burst_loss)
    return Netem(loss_pct=args.loss, burst_enter_pct=enter, burst_leave_pct=leave,
                 burst_loss_pct=loss, seed=args.seed, **extra)


def bench_broadcast(args: argparse.Namespace) -> int:
    from aggbox.workloads.broadcast import run_broadcast

    systems = args.systems.split(",")
    params = {"size": args.size, "receivers": args.receivers, "gap_us": args.gap_us,
              "gap_jitter_us": args.gap_jitter_us, "placement": args.placement}
    netem = _netem(args)
    with NetnsTestbed(args.hosts, netem=None if netem.is_noop() else netem) as tb:
        run = run_broadcast(tb, params, systems, args.iters, args.warmup, args.seed)
    per_system = summarize_broadcast(run.samples, systems)
    result = {"workload": "broadcast", "hosts": args.hosts, "size": args.size,
              "receivers": args.receivers, "loss": args.loss,
              "burst_loss": args.burst_loss, "iters": args.iters,
              "warmup": args.warmup, "gap_us": [args.gap_us, args.gap_us + args.gap_jitter_us],
              "placement": args.placement, **run.placement,
              "systems": per_system}
    ratios, headline = broadcast_ratios(run.samples, per_system, args.receivers)
    if ratios:
        result["ratios"], result["headline"] = ratios, headline
    if args.counters:
        result["nodes"] = run.events
    _emit(result, _print_broadcast_table, args.json)
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


#: per-system allreduce CPU columns (constant over a system's samples), us per call
ALLREDUCE_CPU = ("cpu_us_per_op", "workers_cpu_us_per_op", "aggregator_cpu_us_per_op")
P99_MIN_SAMPLES = 100  # below this a "p99" is the maximum of a few calls: none is given


def summarize_allreduce(samples: list[dict], systems: list[str], floats: int) -> dict:
    """Per system: time p50 with a bootstrap 95% CI of the median, p99 only from
    :data:`P99_MIN_SAMPLES` calls on (else None), the worst error over every rank's
    result, the CPU per call (whole machine and per role, the same on every sample of a
    system), the promise, the CPU sets and the overcommit flag."""
    from aggbox.results import bootstrap_median_ci

    out: dict[str, dict] = {}
    for system in systems:
        rows = [s for s in samples if s["system"] == system]
        first = rows[0] if rows else {}
        times = [r["time_ms"] for r in rows]
        t = _stats(times)
        entry = {"promise": first.get("promise", "app"),
                 "p50_ms": _num(t["p50"], 3),
                 "time_ms_p50_ci": [_num(v, 3) for v in bootstrap_median_ci(times)],
                 "p99_ms": _num(t["p99"], 3) if t["n"] >= P99_MIN_SAMPLES else None,
                 "algbw_gbps": round(floats * 4 / (t["p50"] * 1e6), 4) if t["n"] else None,
                 "max_abs_err": max((r["max_abs_err"] for r in rows), default=None),
                 "ranks_checked": min((r.get("ranks_checked", 1) for r in rows), default=0),
                 "n": t["n"]}
        if system.startswith("aggbox"):  # AggBox's own variants carry their bound
            entry["err_bound"] = max((r["err_bound"] for r in rows), default=None)
            entry["within_bound"] = all(r["within_bound"] for r in rows)
        for key in ALLREDUCE_CPU:
            entry[key] = _num(first.get(key), 1)
        for key in ("procs_per_cpu", "overcommitted", "cpu_source", "cpu_background",
                    "worker_cpus", "aggregator_cpus"):
            entry[key] = first.get(key)
        out[system] = entry
    return out


def allreduce_ratios(samples: list[dict], per_system: dict[str, dict]) -> dict:
    """AggBox / each baseline (< 1: AggBox takes less): time p50 as a ratio of medians with
    a bootstrap 95% CI, CPU per call as the ratio of the two figures (no CI: one figure
    per system); and the strongest baseline (lowest time p50) named, with its ratios."""
    from aggbox.results import bootstrap_ratio_ci

    if "aggbox" not in per_system:
        return {}
    ours = [s["time_ms"] for s in samples if s["system"] == "aggbox"]
    ratios: dict[str, dict] = {}
    for base in per_system:
        if base == "aggbox":
            continue
        ratio, low, high = bootstrap_ratio_ci(
            ours, [s["time_ms"] for s in samples if s["system"] == base])
        if not math.isnan(ratio):
            ratios[f"aggbox/{base} time p50"] = {
                "ratio": round(ratio, 4),
                "ci95": [_num(low, 4), _num(high, 4)]}
        a, b = per_system["aggbox"]["cpu_us_per_op"], per_system[base]["cpu_us_per_op"]
        if a is not None and b:
            ratios[f"aggbox/{base} cpu_us_per_op"] = {"ratio": round(a / b, 4), "ci95": None}
    out: dict = {"ratios": ratios}
    timed = [b for b, s in per_system.items()
             if not b.startswith("aggbox") and s["p50_ms"] is not None]
    if timed:
        strongest = min(timed, key=lambda b: per_system[b]["p50_ms"])
        out["strongest_baseline"] = strongest
        out["strongest_baseline_ratio"] = {
            "time p50": ratios.get(f"aggbox/{strongest} time p50"),
            "cpu_us_per_op": ratios.get(f"aggbox/{strongest} cpu_us_per_op")}
    return out


def _print_allreduce_table(results: list[dict]) -> None:
    first = next(iter(results[0]["systems"].values()), {}) if results else {}
    print(f"allreduce: {results[0]['workers'] if results else '?'} workers + the aggregator "
          "host; promise app (every worker's application holds the sum)\n"
          "times in ms: p50, bootstrap 95% CI of the median, "
          f"p99 (- with fewer than {P99_MIN_SAMPLES} calls)\n"
          f"CPU per call in ms: the whole machine ({first.get('cpu_source') or '?'}, "
          f"{first.get('cpu_background')} busy CPUs of background subtracted), the workers'\n"
          "processes, the aggregator's process (AggBox's aggregator works in softirq: in the "
          "machine figure only)\n"
          f"CPUs: workers {first.get('worker_cpus') or '?'}, aggregator "
          f"{first.get('aggregator_cpus') or '?'}; p/cpu: processes a call needs per CPU "
          "(! = overcommitted)")
    head = (f"{'bytes':>9} {'system':<7} {'p50':>8} {'95% CI':>15} {'p99':>8} {'GB/s':>6} "
            f"{'max err':>8} {'bound':>8} {'cpu/op':>7} {'workers':>7} {'aggr':>7} "
            f"{'p/cpu':>5}")
    _print_head(head)
    for res in results:
        for name, s in res["systems"].items():
            ci = _ci_cell(s.get("time_ms_p50_ci"), ".3g")
            cpu = [None if s.get(k) is None else s[k] / 1e3 for k in ALLREDUCE_CPU]
            print(f"{res['floats'] * 4:>9} {name:<7} {_cell(s['p50_ms'], 8, '.3f')} {ci:>15} "
                  f"{_cell(s['p99_ms'], 8, '.3f')} {_cell(s['algbw_gbps'], 6, '.3f')} "
                  f"{_cell(s['max_abs_err'], 8, '.1e')} {_cell(s.get('err_bound'), 8, '.1e')} "
                  f"{_cell(cpu[0], 7, '.2f')} {_cell(cpu[1], 7, '.2f')} "
                  f"{_cell(cpu[2], 7, '.2f')} {_procs_per_cpu_cell(s):>5}")
        for name, r in res.get("ratios", {}).items():
            ci = r.get("ci95")
            ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""
            print(f"{'':>9} {name}: {r['ratio']:.3f}{ci_text}")
        if res.get("strongest_baseline"):
            print(f"{'':>9} strongest baseline (lowest time p50): {res['strongest_baseline']}")


def bench_allreduce(args: argparse.Namespace) -> int:
    from aggbox.workloads.allreduce import run_allreduce

    systems = args.systems.split(",")
    netem = _netem(args)
    results = []
    with NetnsTestbed(args.workers + 1, mtu=args.mtu,
                      netem=None if netem.is_noop() else netem) as tb:
        for floats in parse_sizes(args.floats):
            params = {"floats": floats, "block": args.block,
                      "distribution": args.distribution}
            run = run_allreduce(tb, params, systems, args.iters, args.warmup, args.seed)
            res = {"workload": "allreduce", "workers": args.workers, "floats": floats,
                   "mtu": args.mtu, "loss": args.loss,
                   "burst_loss": args.burst_loss, "iters": args.iters,
                   "warmup": args.warmup,
                   "systems": summarize_allreduce(run.samples, systems, floats)}
            res.update(allreduce_ratios(run.samples, res["systems"]))
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


MAPREDUCE_DETAIL = ("map_s", "done_wait_s", "reducer_read_s", "read_input_s")
#: per-system CPU columns (per job, constant over a system's samples) -> their ms name
MAPREDUCE_CPU = {"cpu_us_per_op": "cpu_ms_per_job",
                 "mappers_cpu_us_per_op": "mappers_cpu_ms_per_job",
                 "reducers_cpu_us_per_op": "reducers_cpu_ms_per_job"}
#: the like-for-like pairs (baseline, AggBox, why alike): the same combiner on both sides
MAPREDUCE_PAIRS = (("tcp_combiner", "aggbox", "both with combiner"),
                   ("tcp", "aggbox_nocombiner", "both without combiner"))


def summarize_mapreduce(samples: list[dict], systems: list[str]) -> dict[str, dict]:
    """Per system: medians over the measured jobs (min and max beside them; job_s with a
    bootstrap 95% CI of the median), the CPU per job (whole machine and per role, the same
    on every sample of a system), the promise and the overcommit flag; exact only if every
    job was exact."""
    from aggbox.results import bootstrap_median_ci

    out: dict[str, dict] = {}
    for system in systems:
        rows = [s for s in samples if s["system"] == system]
        first = rows[0] if rows else {}
        entry: dict = {"n": len(rows), "exact": bool(rows) and all(r["exact"] for r in rows),
                       "promise": first.get("promise", "app")}
        for metric in ("job_s", "after_last_send_s", "reducer_cpu_s", "pairs_per_s",
                       *MAPREDUCE_DETAIL):
            x = np.asarray([r[metric] for r in rows if r.get(metric) is not None], dtype=float)
            if x.size == 0:
                entry[metric] = None
                continue
            digits = 0 if metric == "pairs_per_s" else 5
            entry[metric] = round(float(np.median(x)), digits)
            if metric in ("job_s", "after_last_send_s"):
                entry[f"{metric}_min"] = round(float(x.min()), 5)
                entry[f"{metric}_max"] = round(float(x.max()), 5)
            if metric == "job_s":
                # With 3 jobs the percentile interval is about (min, max): read it so.
                entry["job_s_p50_ci"] = [_num(v, 5) for v in bootstrap_median_ci(x)]
        for us, ms in MAPREDUCE_CPU.items():
            entry[us] = _num(first.get(us), 1)
            entry[ms] = None if entry[us] is None else round(entry[us] / 1e3, 2)
        entry["procs_per_cpu"] = first.get("procs_per_cpu")
        entry["overcommitted"] = first.get("overcommitted")
        entry["cpu_source"] = first.get("cpu_source", "")
        for count in ("shuffled_pairs", "packets", "retransmits", "spilled_pairs", "keys"):
            entry[count] = int(np.median([r[count] for r in rows])) if rows else 0
        out[system] = entry
    return out


def mapreduce_ratios(samples: list[dict], per_system: dict[str, dict]) -> dict[str, dict]:
    """Baseline / AggBox, like for like only (:data:`MAPREDUCE_PAIRS`; > 1: AggBox takes
    less). ``job_s`` is the headline; ``after_last_send_s`` is kept but is not a reduce
    phase (AggBox reduced inside the mappers' sends); ``cpu per job`` is the machine's.
    Time ratios are ratios of medians with a bootstrap 95% CI; CPU ratios have none (one
    figure per system)."""
    from aggbox.results import bootstrap_ratio_ci

    ratios: dict[str, dict] = {}
    for base, ours, alike in MAPREDUCE_PAIRS:
        if base not in per_system or ours not in per_system:
            continue
        for metric, headline in (("job_s", True), ("after_last_send_s", False)):
            a = [s[metric] for s in samples if s["system"] == base]
            b = [s[metric] for s in samples if s["system"] == ours]
            ratio, low, high = bootstrap_ratio_ci(a, b)
            if math.isnan(ratio):
                continue
            ratios[f"{metric} {base}/{ours}"] = {
                "ratio": round(ratio, 3), "ci95": [_num(low, 3),
                                                   _num(high, 3)],
                "pair": alike, "headline": headline}
        a, b = per_system[base].get("cpu_us_per_op"), per_system[ours].get("cpu_us_per_op")
        if a and b:
            ratios[f"cpu per job {base}/{ours}"] = {"ratio": round(a / b, 3), "ci95": None,
                                                    "pair": alike, "headline": False}
    return ratios


def _print_mapreduce_table(result: dict) -> None:
    """The table (every line under 110 columns) and the like-for-like ratios."""
    c = result["corpus"]
    systems = result["systems"]
    any_system = next(iter(systems.values()), {})
    print(f"mapreduce word count: {result['mappers']} mappers -> {result['reducers']} "
          f"reducer(s), {result['words']} words ({c.get('distinct', '?')} distinct, "
          f"vocab {result['vocab']}, skew {result['skew']})")
    over = any_system.get("overcommitted")
    print(f"loss {result['loss']}%, placement {result['placement']}, promise app; "
          f"{any_system.get('procs_per_cpu')} processes per CPU"
          + (": OVERCOMMITTED" if over else ""))
    print("job_s: median s, bootstrap 95% CI; after: the last mapper's last send -> "
          "counts final (ms)")
    print(f"CPU per job (ms): whole machine ({any_system.get('cpu_source') or '?'}, "
          "idle background subtracted), mapper and reducer processes")
    head = (f"{'system':<17} {'job_s':>6} {'95% CI':>15} {'after':>7} {'cpu/job':>7} "
            f"{'mappers':>7} {'reducers':>8} {'Mpair/s':>7} {'shuffled':>8} {'rtx':>4} "
            f"{'n':>3} exact")
    _print_head(head)
    for name, s in systems.items():
        ci = _ci_cell(s.get("job_s_p50_ci"), ".3f")
        print(f"{name:<17} {_cell(s['job_s'], 6, '.3f')} {ci:>15} "
              f"{_cell(s['after_last_send_s'], 7, '.1f', 1e3)} "
              f"{_cell(s['cpu_ms_per_job'], 7)} {_cell(s['mappers_cpu_ms_per_job'], 7)} "
              f"{_cell(s['reducers_cpu_ms_per_job'], 8)} "
              f"{_cell(s['pairs_per_s'], 7, '.2f', 1e-6)} {s['shuffled_pairs']:>8} "
              f"{s['retransmits']:>4} {s['n']:>3} {s['exact']}")
    print("baseline / AggBox, like for like (> 1: AggBox takes less):")
    for name, r in result.get("ratios", {}).items():
        ci = r.get("ci95")
        ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else ""
        label = "HEADLINE " if r["headline"] else "         "
        print(f"  {label}{name} ({r['pair']}): {r['ratio']:.2f}x{ci_text}")


def bench_mapreduce(args: argparse.Namespace) -> int:
    from aggbox.workloads.mapreduce import run_mapreduce

    systems = args.systems.split(",")
    params = {"mappers": args.mappers, "reducers": args.reducers, "words": args.words,
              "vocab": args.vocab, "skew": args.skew, "files": args.files,
              "corpus": args.corpus or "", "map_entries": args.map_entries,
              "window": args.window, "placement": args.placement}
    netem = _netem(args, duplicate_pct=args.duplicate)
    with NetnsTestbed(args.mappers + args.reducers,
                      netem=None if netem.is_noop() else netem) as tb:
        run = run_mapreduce(tb, params, systems, args.iters, args.warmup, args.seed)
    per_system = summarize_mapreduce(run.samples, systems)
    result = {"workload": "mapreduce", "mappers": args.mappers, "reducers": args.reducers,
              "words": run.corpus.get("tokens", args.words), "vocab": args.vocab,
              "skew": args.skew, "loss": args.loss,
              "burst_loss": args.burst_loss, "duplicate": args.duplicate,
              "placement": args.placement, "iters": args.iters, "warmup": args.warmup,
              "corpus": run.corpus, "systems": per_system,
              "ratios": mapreduce_ratios(run.samples, per_system)}
    if args.counters:
        result["nodes"] = run.events
    _emit(result, _print_mapreduce_table, args.json)
    return 0 if all(s["exact"] for s in per_system.values()) else 1


def bench_quant(args: argparse.Namespace) -> int:
    """The allreduce edge alone, one process, one thread, no testbed: quantize (block
    peaks + exponents + the fused multiply/rint into a reused int32 buffer) and dequantize
    (int32 sums into a reused float32 result), in GB/s of float32 tensor per core. Warm
    caches and a reused result: an allreduce call also pays cold caches and, for a new
    result array, its page faults (docs/allreduce.md, where the time goes)."""
    import time

    from aggbox import native, quant
    from aggbox.collectives.allreduce import max_block

    block = args.block or max_block(args.mtu)
    results = []
    for floats in parse_sizes(args.floats):
        x = np.random.default_rng(args.seed).standard_normal(floats).astype(np.float32)
        q = np.empty(floats, dtype=np.int32)
        scratch = np.empty(quant.scratch_size(floats, block), dtype=np.float32)
        y = np.empty(floats, dtype=np.float32)

        def quantize(x=x, q=q, scratch=scratch):
            # what Allreducer.allreduce runs in aligned mode (the default)
            return quant.quantize_own_into(x, block, args.workers, q, scratch)

        exps = quantize()
        sums = q  # the same magnitudes as the kernel's sums: the dequantize cost is the same

        def dequantize(exps=exps, sums=sums, y=y):
            quant.dequantize_into(sums, exps, block, args.workers, y)

        row = {"floats": floats, "bytes": x.nbytes, "block": block, "workers": args.workers,
               "edge": native.status()}
        for name, fn in (("quantize", quantize), ("dequantize", dequantize)):
            times = []
            for _ in range(args.warmup):
                fn()
            for _ in range(args.iters):
                t0 = time.perf_counter_ns()
                fn()
                times.append(time.perf_counter_ns() - t0)
            p50 = float(np.median(times))
            row[f"{name}_us_p50"] = round(p50 / 1e3, 1)
            row[f"{name}_gbps"] = round(x.nbytes / p50, 2)  # bytes per ns = GB/s
        results.append(row)
    print(f"{'floats':>10} {'block':>6}  {'quantize us':>11} {'GB/s':>6}  "
          f"{'dequantize us':>13} {'GB/s':>6}   (one core, p50; edge: {native.status()})")
    for r in results:
        print(f"{r['floats']:>10} {r['block']:>6}  {r['quantize_us_p50']:>11.1f} "
              f"{r['quantize_gbps']:>6.2f}  {r['dequantize_us_p50']:>13.1f} "
              f"{r['dequantize_gbps']:>6.2f}")
    if args.json:
        print(json.dumps({"workload": "quant", "sweep": results} if len(results) > 1
                         else {"workload": "quant", **results[0]}))
    sys.stdout.flush()
    return 0


def _print_training_table(result: dict) -> None:
    print(f"training ({result['task']}, {result['parameters']} parameters): "
          f"{result['workers']} DDP ranks + the aggregator host; promise app; times per "
          "iteration in ms (p50, 95% CI), comm: time in the gradient hook; CPU per iteration "
          "in ms (whole machine)")
    head = (f"{'system':<10} {'p50':>9} {'95% CI':>19} {'comm':>8} {'cpu/it':>8} "
            f"{'p/cpu':>5} {'accuracy':>16}")
    _print_head(head)
    for name, s in result["systems"].items():
        ci = _ci_cell(s.get("iter_ms_p50_ci"), ".4g")
        cpu = None if s.get("cpu_us_per_op") is None else s["cpu_us_per_op"] / 1e3
        acc = (f"{100 * s['test_accuracy_mean']:.2f}+-{100 * s['test_accuracy_std']:.2f}%"
               if s.get("test_accuracy_mean") is not None else "-")
        print(f"{name:<10} {_cell(s['iter_ms_p50'], 9, '.3f')} {ci:>19} "
              f"{_cell(s['comm_ms_p50'], 8, '.3f')} {_cell(cpu, 8, '.2f')} "
              f"{_procs_per_cpu_cell(s):>5} {acc:>16}")
    for name, r in result.get("ratios", {}).items():
        extra = "".join(f", {k} {v}" for k, v in r.items() if k not in ("iter_ms_ratio",
                                                                        "ci95"))
        print(f"  {name}: time per iteration {r['iter_ms_ratio']:.3f} {r['ci95']}{extra}")


def bench_training(args: argparse.Namespace) -> int:
    from aggbox.workloads.training import parameter_count, ratios, run_training, summarize

    systems = args.systems.split(",")
    iters = args.iters if args.iters is not None else (300 if args.task == "digits" else 50)
    params = {"task": args.task, "seeds": args.seeds, "timeout_s": args.timeout}
    with NetnsTestbed(args.workers + 1, mtu=args.mtu) as tb:
        run = run_training(tb, params, systems, iters, args.warmup, args.seed)
    result = {"workload": "training", "task": args.task, "workers": args.workers,
              "parameters": parameter_count(args.task), "iters": iters,
              "warmup": args.warmup if args.task != "digits" else 0,
              "seeds": [args.seed + k for k in range(args.seeds)],
              "systems": summarize(run.samples, systems)}
    result["ratios"] = ratios(run.samples, result["systems"])
    if args.counters:
        result["nodes"] = run.events
    _emit(result, _print_training_table, args.json)
    if args.task == "digits":
        return 0 if all(s.get("converged") for s in result["systems"].values()) else 1
    return 0


def _systems_type(workload: str):
    """``--systems`` of ``workload``: comma-separated names it knows (registry.SYSTEMS),
    refused at parse time otherwise; the value stays the string the bench splits."""
    from aggbox.workloads.registry import SYSTEMS

    known = SYSTEMS[workload]

    def systems(text: str) -> str:
        unknown = [name for name in text.split(",") if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown system(s) {', '.join(unknown)}; {workload} has: {', '.join(known)}")
        return text

    return systems


def _add_link_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loss", type=float, default=0.0, help="loss on every link, percent")
    p.add_argument("--burst-loss", default="", metavar="ENTER,LEAVE,LOSS",
                   help="Gilbert-Elliott burst loss on every link, percent each, e.g. "
                   "1,10,70 (default: none)")


def _add_run_options(p: argparse.ArgumentParser, workload: str, systems: str,
                     counters: str) -> None:
    """The options every testbed bench has: systems, seed, counters, JSON."""
    from aggbox.workloads.registry import SYSTEMS

    p.add_argument("--systems", type=_systems_type(workload), default=systems,
                   help="comma-separated systems to compare, from: "
                   + ", ".join(SYSTEMS[workload]))
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the workload's random choices and of the links' loss")
    p.add_argument("--counters", action="store_true", help=counters)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")


def register(subparsers) -> None:
    from aggbox.cli import examples

    bench = subparsers.add_parser(
        "bench", help="measure one point: AggBox vs its baselines",
        description="One measurement point per run, every system side by side on one "
        "testbed, interleaved, after a warm-up; aggbox bench WORKLOAD --help for its options.",
        epilog=examples("aggbox bench broadcast --hosts 8 --receivers busy",
                        "aggbox bench allreduce --floats 1Ki:1Mi --json"))
    workloads = bench.add_subparsers(dest="workload", metavar="WORKLOAD")
    workloads.required = True

    b = workloads.add_parser(
        "broadcast", help="broadcast latency and CPU, AggBox vs TCP (kernel ACKs and app "
        "ACKs), UDP and IP multicast",
        epilog=examples("aggbox bench broadcast --hosts 8 --size 1024 --iters 100",
                        "aggbox bench broadcast --receivers busy --systems aggbox,tcp_kack "
                        "--json"))
    b.add_argument("--hosts", type=int, default=16, help="testbed hosts: 1 root + N-1 members")
    b.add_argument("--size", type=int, default=64, help="payload bytes per broadcast")
    b.add_argument("--iters", type=int, default=300, help="measured broadcasts per system")
    b.add_argument("--warmup", type=int, default=30, help="unmeasured broadcasts per system")
    b.add_argument("--receivers", choices=("idle", "busy", "spin"), default="idle",
                   help="members' applications: blocked in recv (idle), available once per "
                   "1 ms at a random phase without using CPU (busy), or spinning the CPU in "
                   "1 ms units (spin, the old model: overcommits the CPUs)")
    b.add_argument("--gap-us", type=int, default=2000,
                   help="least pause between broadcasts, so each starts on a quiet system")
    b.add_argument("--gap-jitter-us", type=int, default=1000,
                   help="the pause is uniform in [gap, gap + jitter] (seeded), so sends "
                   "cannot phase-lock with the busy members' 1 ms unit")
    b.add_argument("--placement", choices=("root-alone", "shared"), default="root-alone",
                   help="CPUs on this one machine: the root alone on CPU 0 (root-alone) or "
                   "every host on every CPU (shared)")
    _add_link_options(b)
    _add_run_options(b, "broadcast", "aggbox,tcp_kack,tcp,udp,mcast",
                     "include node stats and counters")
    b.set_defaults(func=bench_broadcast)

    a = workloads.add_parser(
        "allreduce", help="float32 allreduce, AggBox vs gloo and TCP PS",
        epilog=examples("aggbox bench allreduce --workers 4 --floats 262144 --iters 50",
                        "aggbox bench allreduce --floats 1Ki:64Mi --systems aggbox,tcp_ps "
                        "--json"))
    a.add_argument("--workers", type=int, default=8,
                   help="worker hosts (the testbed has one more: the aggregator)")
    a.add_argument("--floats", default="262144",
                   help="floats per tensor: N, a list N,M or a doubling range 1Ki:64Mi")
    a.add_argument("--iters", type=int, default=20, help="measured calls per system")
    a.add_argument("--warmup", type=int, default=5, help="unmeasured calls per system")
    a.add_argument("--block", type=int, default=0,
                   help="int32 values per packet (0: the largest the MTU allows)")
    a.add_argument("--mtu", type=int, default=65000,
                   help="testbed MTU, for every system (65000: 16 Ki-value AggBox blocks)")
    a.add_argument("--distribution", default="gaussian",
                   choices=("gaussian", "uniform", "heavy", "zeros"),
                   help="how the tensors' values are drawn")
    _add_link_options(a)
    _add_run_options(a, "allreduce", "aggbox,gloo,tcp_ps", "include node records")
    a.set_defaults(func=bench_allreduce)

    m = workloads.add_parser(
        "mapreduce", help="word count: in-kernel reduce-by-key vs TCP shuffles",
        description="One MapReduce word count per system and repetition, systems "
        "interleaved; each job is checked against collections.Counter over the corpus.",
        epilog=examples("aggbox bench mapreduce --mappers 4 --reducers 2 --words 500000",
                        "aggbox bench mapreduce --corpus docs/ --systems aggbox,tcp_combiner "
                        "--json"))
    m.add_argument("--mappers", type=int, default=4, help="mapper hosts")
    m.add_argument("--reducers", type=int, default=1, help="reducer hosts")
    m.add_argument("--words", type=int, default=2_000_000, help="Zipf corpus: total words")
    m.add_argument("--vocab", type=int, default=50_000, help="Zipf corpus: distinct words")
    m.add_argument("--skew", type=float, default=1.0, help="Zipf exponent (0: uniform)")
    m.add_argument("--files", type=int, default=4, help="Zipf corpus: files")
    m.add_argument("--corpus", help="a text file or folder to count instead of a Zipf corpus "
                   "(default: a Zipf corpus)")
    m.add_argument("--iters", type=int, default=5,
                   help="measured jobs per system (5: a bootstrap CI worth reading)")
    m.add_argument("--warmup", type=int, default=1, help="unmeasured jobs per system")
    m.add_argument("--map-entries", type=int, default=131072,
                   help="distinct keys the reducer's kernel holds (a multiple of 128)")
    m.add_argument("--window", type=int, default=64, help="AggBox packets in flight")
    m.add_argument("--placement", choices=("shared", "reducers-alone"), default="shared",
                   help="CPUs: every host on every CPU (shared), or the reducers alone on "
                   "CPU 0 (reducers-alone)")
    _add_link_options(m)
    m.add_argument("--duplicate", type=float, default=0.0, help="duplication, percent")
    _add_run_options(m, "mapreduce", "aggbox,aggbox_nocombiner,tcp,tcp_combiner",
                     "include kernel counters")
    m.set_defaults(func=bench_mapreduce)

    t = workloads.add_parser(
        "training", help="DDP training: gloo's allreduce, gloo with fp16 compression and "
        "AggBox's hook",
        description="Every rank trains one model per system and seed, from the same weights "
        "on the same data order; digits: accuracy, comm-heavy: time per iteration.",
        epilog=examples("aggbox bench training --task digits --seeds 3",
                        "aggbox bench training --task comm-heavy --iters 20 --json"))
    t.add_argument("--workers", type=int, default=4, help="DDP ranks")
    t.add_argument("--task", choices=("digits", "comm-heavy"), default="digits",
                   help="digits: a small classifier to convergence (accuracy); comm-heavy: "
                   "3.2 M parameters (time per iteration)")
    t.add_argument("--seeds", type=int, default=1, help="seeds (seed, seed+1, ...)")
    t.add_argument("--iters", type=int, default=None,
                   help="measured steps per system and seed (default: digits 300, "
                   "comm-heavy 50)")
    t.add_argument("--warmup", type=int, default=3, help="comm-heavy: unmeasured steps")
    t.add_argument("--mtu", type=int, default=65000, help="testbed MTU, every system")
    t.add_argument("--timeout", type=float, default=30.0, help="AggBox call timeout, s")
    _add_run_options(t, "training", "gloo,gloo_fp16,aggbox", "include node records")
    t.set_defaults(func=bench_training)

    q = workloads.add_parser(
        "quant", help="the allreduce edge alone: quantize and dequantize throughput per core "
        "(one process, no testbed)",
        epilog=examples("aggbox bench quant --floats 1Ki:64Mi",
                        "aggbox bench quant --floats 262144 --workers 16 --json"))
    q.add_argument("--floats", default="262144",
                   help="float32 values per tensor: N, a list N,M or a doubling range")
    q.add_argument("--workers", type=int, default=8, help="group size (sets the headroom B)")
    q.add_argument("--block", type=int, default=0, help="values per block (0: the MTU's)")
    q.add_argument("--mtu", type=int, default=65000, help="as the allreduce bench's default")
    q.add_argument("--iters", type=int, default=200, help="measured calls of each step")
    q.add_argument("--warmup", type=int, default=20, help="unmeasured calls of each step")
    q.add_argument("--seed", type=int, default=1, help="seed of the tensor's values")
    q.add_argument("--json", action="store_true", help="last line: one JSON object")
    q.set_defaults(func=bench_quant)
