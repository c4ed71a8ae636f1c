"""The training benchmark: DistributedDataParallel over gloo, its gradients averaged by
gloo's allreduce, gloo with fp16 compression, or AggBox's in-kernel hook.

Hosts: h0 is the aggregator (it holds bpf/aggregate.c and installs the DDP job it reads
from the process group's store: ``aggbox.torch.install_from_store``), h1..hN the ranks.
Every rank is one process that joins one gloo process group (DDP's own, whatever system
averages the gradients) and trains, for each seed, one model per system from the same
initial weights on the same data order:

- ``gloo``: DDP's default allreduce (``default_hooks.allreduce_hook``, what DDP runs with
  no hook, registered so its time can be taken);
- ``gloo_fp16``: ``default_hooks.fp16_compress_hook`` (gradients sent as float16);
- ``aggbox``: :func:`aggbox.torch.allreduce_hook`.

Tasks:

- ``digits``: scikit-learn's handwritten digits (shipped with the package), a train/test
  split fixed by the seed, an MLP (64-128-10) trained with SGD and momentum for ``iters``
  steps of a global batch split over the ranks; recorded: rank 0's training loss per
  step, the final test accuracy and loss (every rank holds the same weights).
- ``comm-heavy``: an MLP of about 3.2 M parameters (12.6 MB of gradients per step) on
  synthetic inputs, where the gradient exchange dominates; recorded: time per iteration.

Per measured iteration (every task): ``iter_ms`` (rank 0, forward + backward + step: the
ranks are in lockstep through the gradient exchange), ``comm_ms`` (rank 0's time between
each bucket's hook call and its future's completion, summed over the step's buckets:
both gloo's allreduce and AggBox's hook (its worker thread) overlap backward, so the sum
can exceed the part of the step spent waiting). CPU per iteration
(``cpu_us_per_op``): the whole machine's busy CPU (aggbox.cpu.MachineCpu) over each
system's measured iterations, read by rank 0 between two barriers, background subtracted.
Promise ``app`` for every system (each rank's optimizer holds the mean); every rank must
run for a step to complete (AggBox's aggregator is kernel-only).

Backends: netns, docker (the image carries torch and scikit-learn: docker/Dockerfile) and
ansible (the hosts' ``aggbox_python`` must have them; a host whose Python lacks them
fails at start with that message).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from aggbox.errors import AggBoxError
from aggbox.testbed.base import Testbed
from aggbox.workloads.allreduce import concurrency_groups, placement

SYSTEMS = ("gloo", "gloo_fp16", "aggbox")
TASKS = ("digits", "comm-heavy")
PROMISE = "app"
MASTER_PORT = 29610  # rank 0's store and gloo's rendezvous
DIGITS_BATCH = 64  # global batch, split over the ranks
HEAVY_WIDTH, HEAVY_LAYERS, HEAVY_BATCH = 1024, 3, 16  # 3 x 1024^2 + ... ~ 3.2 M parameters
CONVERGED_ACCURACY = 0.9  # digits: a system that ends below this did not converge


# ----------------------------------------------------------------- tasks --------------


def digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): the digits, 25 % held out, stratified by seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return xa, ya.astype(np.int64), xb, yb.astype(np.int64)


def build_model(task: str, seed: int):
    import torch

    torch.manual_seed(seed)
    nn = torch.nn
    if task == "digits":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    layers: list = [nn.Linear(HEAVY_WIDTH, HEAVY_WIDTH), nn.ReLU()]
    for _ in range(HEAVY_LAYERS - 1):
        layers += [nn.Linear(HEAVY_WIDTH, HEAVY_WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(HEAVY_WIDTH, 10))


def parameter_count(task: str) -> int:
    return sum(p.numel() for p in build_model(task, 0).parameters())


def digits_batches(n_train: int, world: int, rank: int, steps: int, seed: int):
    """Per step, this rank's row indices of the global batch: an epoch's permutation drawn
    from the seed (the same for every system), cut into global batches, each split over
    the ranks."""
    per_rank = DIGITS_BATCH // world
    out, epoch = [], 0
    while len(out) < steps:
        order = np.random.default_rng([seed, epoch]).permutation(n_train)
        for start in range(0, n_train - DIGITS_BATCH + 1, DIGITS_BATCH):
            batch = order[start:start + DIGITS_BATCH]
            out.append(batch[rank * per_rank:(rank + 1) * per_rank])
            if len(out) == steps:
                break
        epoch += 1
    return out


# ----------------------------------------------------------------- hooks --------------


class Timed:
    """Wraps a DDP hook: per bucket, the time from the call to its future's completion."""

    def __init__(self, hook):
        self.hook, self.ns = hook, 0

    def __call__(self, state, bucket):
        t0 = time.perf_counter_ns()
        fut = self.hook(state, bucket)

        def done(f):
            self.ns += time.perf_counter_ns() - t0
            return f.value()

        return fut.then(done)


def _register(ddp, system: str, aggbox_state) -> Timed:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if system == "gloo":
        timed = Timed(default_hooks.allreduce_hook)
        state = dist.group.WORLD
    elif system == "gloo_fp16":
        timed = Timed(default_hooks.fp16_compress_hook)
        state = dist.group.WORLD
    elif system == "aggbox":
        from aggbox.torch import allreduce_hook

        timed, state = Timed(allreduce_hook), aggbox_state
    else:
        raise AggBoxError(f"unknown training system {system!r}; known: {', '.join(SYSTEMS)}")
    import torch

    # DDP checks a hook's annotations; a callable object has none, so a function with them
    def hook(s, bucket):
        return timed(s, bucket)

    hook.__annotations__ = {"bucket": dist.GradBucket,
                            "return": torch.futures.Future[torch.Tensor]}
    ddp.register_comm_hook(state, hook)
    return timed


# ----------------------------------------------------------------- node roles ---------


def require_training_packages() -> None:
    """torch and scikit-learn, or an error saying which Python on which host lacks them
    (a docker image or an ansible host's ``aggbox_python`` without the training stack)."""
    import importlib.util
    import socket
    import sys

    missing = [m for m in ("torch", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        raise AggBoxError(
            f"the training workload needs torch and scikit-learn on every host: "
            f"{sys.executable} on {socket.gethostname()} lacks {', '.join(missing)} "
            "(docker: rebuild the image, `make image`; ansible: point aggbox_python at a "
            "Python that has them)")


def aggregator_node(spec: dict, rank: int) -> int:
    """Holds AggBox's programs, installs the DDP job from rank 0's store, then sleeps."""
    require_training_packages()
    from aggbox.collectives.allreduce import AggregatorPrograms
    from aggbox.node import emit
    from aggbox.torch import aggregator_store, install_from_store

    tag = f"{spec['pin_tag']}-agg" if spec.get("pin_tag") else ""
    with AggregatorPrograms(spec["ifname"], pin_tag=tag) as programs:
        emit({"event": "ready"})
        try:
            install_from_store(programs, aggregator_store(spec["master"], 300), "training",
                               300)
            while True:
                signal.pause()  # the kernel does the work; the runner ends us (SIGTERM)
        except SystemExit:
            pass
        emit({"event": "done", "role": "aggregator", "counters": programs.counters(),
              "placement": placement()})
    return 0


def _train(task: str, system: str, seed: int, spec: dict, rank: int, world: int, state,
           account, records: list[dict]) -> None:
    import torch
    import torch.distributed as dist

    steps, warmup = spec["iters"], spec["warmup"]
    model = build_model(task, seed)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    timed = _register(ddp, system, state)
    loss_fn = torch.nn.functional.cross_entropy
    if task == "digits":
        xa, ya, xb, yb = digits_split(seed)
        xa, ya = torch.from_numpy(xa), torch.from_numpy(ya)
        steps = spec.get("digits_steps") or steps
        batches = digits_batches(len(xa), world, rank, steps, seed)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        warmup = 0  # every step is part of the loss curve
    else:
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        x = torch.randn(HEAVY_BATCH, HEAVY_WIDTH, generator=g)
        y = torch.randint(0, 10, (HEAVY_BATCH,), generator=g)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    total = warmup + steps if task != "digits" else steps

    def step(i: int) -> float:
        if task == "digits":
            idx = torch.from_numpy(batches[i])
            xb_, yb_ = xa[idx], ya[idx]
        else:
            xb_, yb_ = x, y
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(xb_), yb_)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for i in range(warmup):
        step(i)
    dist.barrier()
    window = (account.window(system, steps) if account is not None
              else contextlib.nullcontext())
    with window:
        for i in range(warmup, total):
            c0 = timed.ns
            t0 = time.perf_counter_ns()
            loss = step(i)
            t1 = time.perf_counter_ns()
            if rank == 0:
                records.append({"system": system, "seed": seed, "iter": i - warmup,
                                "iter_ms": (t1 - t0) / 1e6, "comm_ms": (timed.ns - c0) / 1e6,
                                "loss": loss})
        dist.barrier()
    if rank == 0 and task == "digits":
        with torch.no_grad():
            out = model(torch.from_numpy(xb))
            acc = float((out.argmax(1).numpy() == yb).mean())
            test_loss = float(loss_fn(out, torch.from_numpy(yb)))
        for r in records:
            if r["system"] == system and r["seed"] == seed:
                r.update(test_accuracy=acc, test_loss=test_loss)
    if system == "aggbox" and rank == 0:
        bound = max(state.bucket_bounds.values(), default=float("nan"))
        for r in records:
            if r["system"] == system and r["seed"] == seed:
                r["err_bound"] = bound
        state.bucket_bounds.clear()


def worker_node(spec: dict, rank: int) -> int:
    require_training_packages()
    import torch
    import torch.distributed as dist

    from aggbox.cpu import CpuAccount, MachineCpu
    from aggbox.node import emit, emit_many
    from aggbox.torch import interface_to

    torch.set_num_threads(1)  # one CPU's worth per rank: the machine is shared
    world = len(spec["workers"])
    # gloo binds to the interface of the host name's address unless told (here: loopback)
    os.environ["GLOO_SOCKET_IFNAME"] = interface_to(spec["master"].split(":")[0])[0]
    emit({"event": "ready"})
    dist.init_process_group("gloo", init_method=f"tcp://{spec['master']}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    state = None
    meter = MachineCpu() if rank == 0 else None
    account = CpuAccount(meter) if meter is not None else None
    records: list[dict] = []
    try:
        if "aggbox" in spec["systems"]:
            from aggbox.torch import AggBoxState

            state = AggBoxState.from_process_group(None, aggregator=spec["aggregator"],
                                                   name="training",
                                                   timeout=spec["timeout_s"])
        dist.barrier()
        if account is not None:
            account.calibrate(seconds=0.3)  # the other ranks wait in the next barrier
        dist.barrier()
        for seed in spec["seeds"]:
            order = list(spec["systems"])
            random.Random(seed).shuffle(order)  # no system always runs first
            for system in order:
                _train(spec["task"], system, seed, spec, rank, world, state, account,
                       records)
        dist.barrier()
        emit_many(records)
        done = {"event": "done", "role": "worker", "rank": rank, "placement": placement()}
        if account is not None:
            done["machine_cpu"] = account.as_dict()
        emit(done)
    finally:
        if state is not None:
            state.close()
        if meter is not None:
            meter.close()
        # gloo's threads abort the process at exit unless the group is destroyed first
        dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------- the runner ---------


@dataclass
class TrainingRun:
    samples: list[dict]
    events: list[dict]


def build_spec(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
               seed: int) -> dict:
    agg, workers = testbed.hosts[0], testbed.hosts[1:]
    n_seeds = int(params.get("seeds", 1))
    return {"task": params.get("task", "digits"), "systems": list(systems),
            "workers": [h.ip for h in workers], "aggregator": agg.ip, "ifname": agg.ifname,
            "master": f"{workers[0].ip}:{MASTER_PORT}",
            "seeds": [seed + k for k in range(n_seeds)], "iters": iters, "warmup": warmup,
            # digits trains to convergence whatever the iterations a time figure needs
            "digits_steps": int(params.get("digits_steps", 0)) or iters,
            "timeout_s": float(params.get("timeout_s", 30)),
            "pin_tag": getattr(testbed, "run_id", "")}


def cpu_columns(events: list[dict], systems: list[str]) -> dict[str, dict]:
    from aggbox.cpu import concurrency, per_op_from_dict

    workers = [e for e in events if e.get("role") == "worker"]
    machine = next((e["machine_cpu"] for e in workers if "machine_cpu" in e), None)
    places = [e["placement"] for e in workers if "placement" in e]
    ppc, over = concurrency(concurrency_groups(places)) if places else (float("nan"), False)
    out = {}
    for system in systems:
        out[system] = {
            "promise": PROMISE,
            "cpu_us_per_op": (per_op_from_dict(machine, system) if machine is not None
                              else float("nan")),
            "procs_per_cpu": ppc, "overcommitted": bool(over),
            "cpu_source": machine["source"] if machine is not None else "",
            # busy CPUs while idle (subtracted); near the CPU count the figure is noise
            "cpu_background": (round(machine["background_rate"], 3) if machine is not None
                               else float("nan"))}
    return out


def run_training(testbed: Testbed, params: dict, systems: list[str], iters: int,
                 warmup: int, seed: int) -> TrainingRun:
    from aggbox.workloads.launcher import NodeGroup

    if len(testbed.hosts) < 2:
        raise AggBoxError("training needs an aggregator host and at least one worker")
    task = params.get("task", "digits")
    if task not in TASKS:
        raise AggBoxError(f"unknown training task {task!r}; known: {', '.join(TASKS)}")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise AggBoxError(f"unknown training system(s) {unknown}; known: {', '.join(SYSTEMS)}")
    spec = build_spec(testbed, params, systems, iters, warmup, seed)
    agg, workers = testbed.hosts[0], testbed.hosts[1:]
    per_step = 0.05 if task == "digits" else 2.0
    n_steps = spec["digits_steps"] if task == "digits" else warmup + iters
    budget = 300 + len(spec["seeds"]) * len(systems) * n_steps * per_step
    with NodeGroup(spec) as nodes:
        started = []
        if "aggbox" in systems:
            box = nodes.start(agg, "training-aggregator", 0)
            nodes.wait_ready([box], timeout=120)
            started.append(box)
        ranks = [nodes.start(h, "training-worker", i) for i, h in enumerate(workers)]
        nodes.wait_ready(ranks, timeout=300)
        nodes.wait_exit(ranks, timeout=budget)
        nodes.stop_all()
        records = [r for n in nodes.nodes for r in n.records]
    events = [r for r in records if r.get("event") == "done"]
    columns = cpu_columns(events, list(systems))
    nan = float("nan")
    samples = []
    for r in records:
        if "iter_ms" not in r:
            continue
        samples.append(dict({"test_accuracy": nan, "test_loss": nan, "err_bound": nan}, **r,
                            task=task, workers=len(workers), **columns[r["system"]]))
    return TrainingRun(samples, events)


def run_cell(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
             seed: int) -> list[dict]:
    return run_training(testbed, params, systems, iters, warmup, seed).samples


# ----------------------------------------------------------------- summary ------------


def summarize(samples: list[dict], systems: list[str]) -> dict:
    """Per system: time per iteration p50 (bootstrap CI), communication p50, CPU per
    iteration; digits: final test accuracy per seed and mean +- std, the loss curve
    (rank 0's training loss, mean over seeds, every 10th step), converged."""
    from aggbox.results import bootstrap_median_ci

    def num(v, d=4):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else round(
            float(v), d)

    out: dict[str, dict] = {}
    for system in systems:
        rows = [s for s in samples if s["system"] == system]
        if not rows:
            continue
        first = rows[0]
        times = [r["iter_ms"] for r in rows]
        lo, hi = bootstrap_median_ci(times)
        entry = {"promise": first.get("promise"), "n": len(rows),
                 "iter_ms_p50": num(np.median(times), 3),
                 "iter_ms_p50_ci": [num(lo, 3), num(hi, 3)],
                 "comm_ms_p50": num(np.median([r["comm_ms"] for r in rows]), 3),
                 "cpu_us_per_op": num(first.get("cpu_us_per_op"), 1),
                 "procs_per_cpu": first.get("procs_per_cpu"),
                 "overcommitted": first.get("overcommitted"),
                 "cpu_source": first.get("cpu_source"),
                 "cpu_background": first.get("cpu_background")}
        bounds = [r["err_bound"] for r in rows if not np.isnan(r.get("err_bound", np.nan))]
        if bounds:
            entry["err_bound_max"] = float(max(bounds))
        seeds = sorted({r["seed"] for r in rows})
        accs = {s: next(r["test_accuracy"] for r in rows if r["seed"] == s) for s in seeds}
        if not any(np.isnan(a) for a in accs.values()):
            by_seed = {}
            curves = defaultdict(list)
            for s in seeds:
                mine = sorted((r for r in rows if r["seed"] == s), key=lambda r: r["iter"])
                by_seed[str(s)] = {"test_accuracy": num(accs[s]),
                                   "test_loss": num(mine[0]["test_loss"]),
                                   "final_train_loss": num(np.mean([r["loss"]
                                                                    for r in mine[-10:]]))}
                for r in mine:
                    curves[r["iter"]].append(r["loss"])
            a = np.array(list(accs.values()))
            entry.update(test_accuracy_mean=num(a.mean()), test_accuracy_std=num(a.std()),
                         converged=bool((a >= CONVERGED_ACCURACY).all()), per_seed=by_seed,
                         loss_curve={str(i): num(np.mean(v)) for i, v in
                                     sorted(curves.items()) if i % 10 == 0})
        out[system] = entry
    return out


def ratios(samples: list[dict], per_system: dict[str, dict]) -> dict:
    """AggBox / each baseline: time per iteration (ratio of medians, bootstrap CI), CPU
    per iteration, and for digits the accuracy difference in percentage points."""
    from aggbox.results import bootstrap_ratio_ci

    if "aggbox" not in per_system:
        return {}
    ours = [s["iter_ms"] for s in samples if s["system"] == "aggbox"]
    out: dict = {}
    for base in per_system:
        if base == "aggbox":
            continue
        r, lo, hi = bootstrap_ratio_ci(ours, [s["iter_ms"] for s in samples
                                              if s["system"] == base])
        entry = {"iter_ms_ratio": round(r, 4), "ci95": [round(lo, 4), round(hi, 4)]}
        a, b = per_system["aggbox"]["cpu_us_per_op"], per_system[base]["cpu_us_per_op"]
        if a is not None and b:
            entry["cpu_ratio"] = round(a / b, 4)
        acc_a = per_system["aggbox"].get("test_accuracy_mean")
        acc_b = per_system[base].get("test_accuracy_mean")
        if acc_a is not None and acc_b is not None:
            entry["accuracy_diff_pp"] = round(100 * (acc_a - acc_b), 2)
        out[f"aggbox/{base}"] = entry
    return out
