"""One torch.distributed rank for tests/kernel/test_torch_hook.py, run in a host's namespace.

    python tests/kernel/torch_rank.py CONFIG_JSON

CONFIG: {"rank", "world", "master": "ip:port", "aggregator": ip, "scenario", "out": dir,
...}. The rank joins a gloo process group, builds :class:`AggBoxState` from it, plays its
scenario and writes ``<out>/rank<r>.json`` (and .npy arrays) for the test to check;
failures are written, not raised: ``{"error": type, "message": ..., "elapsed": s}``.

Scenarios: ``buckets`` (the hook on synthetic buckets of the given sizes and dtypes),
``die`` (rank ``victim`` exits after the first bucket; the others call again), ``nan``
(rank ``victim``'s bucket holds a NaN), ``ddp`` (a DistributedDataParallel model trained
a few steps with gloo's allreduce, then from the same start with the AggBox hook),
``setup`` (only the state: nobody installs the job, unless the test does). ``keys``: each
rank's auth key (hex; absent: none).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from aggbox.torch import AggBoxState, allreduce_hook


class FakeBucket:
    """What the hook reads of DDP's GradBucket."""

    def __init__(self, buffer: torch.Tensor, index: int):
        self._buffer, self._index = buffer, index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return self._index


CALL: dict[str, float] = {}  # when the call that should fail started
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bucket_input(rank: int, size: int, dtype: str, seed: int,
                 scale: float = 1.0) -> torch.Tensor:
    """Gradient-like values (1e-3 scale, some large; times ``scale``), reproducible; the
    test makes the same ones for its reference."""
    rng = np.random.default_rng([seed, rank, size])
    x = rng.standard_normal(size) * 1e-3 * scale
    x[:: 97] *= 1e3
    return torch.from_numpy(x.astype(np.float32)).to(DTYPES[dtype])


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def train(ddp: torch.nn.Module, rank: int, steps: int) -> None:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(32, 64, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()


def play(cfg: dict, out: Path) -> dict:
    rank = cfg["rank"]
    kw = {"timeout": cfg.get("timeout", 10.0), "setup_timeout": cfg.get("setup_timeout", 60),
          "auth_key": cfg["keys"][rank] if "keys" in cfg else ""}
    state = AggBoxState.from_process_group(None, aggregator=cfg["aggregator"], **kw)
    result: dict = {"group_size": state.group.size, "job_id": state.group.job_id,
                    "authenticated": state.reducer.key is not None}
    scenario = cfg["scenario"]
    if scenario == "buckets":
        for k, (size, dtype, *scale) in enumerate(cfg["buckets"]):
            buf = bucket_input(rank, size, dtype, cfg["seed"], *scale)
            x32 = buf.reshape(-1).numpy() if dtype == "float32" else None
            y = allreduce_hook(state, FakeBucket(buf, k)).wait()
            np.save(out / f"rank{rank}-{k}.npy", y.to(torch.float32).numpy())
            np.save(out / f"rank{rank}-{k}-bound.npy", state.last_error_bound.numpy())
            if x32 is not None:  # the quantizer read the bucket's own memory
                result.setdefault("shares", []).append(
                    bool(np.shares_memory(x32, buf.numpy())))
            result.setdefault("dtypes", []).append(str(y.dtype))
    elif scenario in ("die", "nan"):
        victim = cfg["victim"]
        buf = bucket_input(rank, 1000, "float32", cfg["seed"])
        allreduce_hook(state, FakeBucket(buf, 0)).wait()
        if scenario == "die" and rank == victim:
            os._exit(0)  # dies mid-step: its next bucket never comes
        if scenario == "nan" and rank == victim:
            buf[5] = float("nan")
        CALL["start"] = time.monotonic()
        allreduce_hook(state, FakeBucket(buf, 3)).wait()
    elif scenario == "ddp":
        steps = cfg.get("steps", 5)
        params = {}
        for system in ("gloo", "aggbox"):
            net = model(cfg["seed"])
            ddp = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.01)
            if system == "aggbox":
                ddp.register_comm_hook(state, allreduce_hook)
            train(ddp, rank, steps)
            params[system] = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        init = torch.cat([p.detach().reshape(-1) for p in model(cfg["seed"]).parameters()])
        result.update(max_diff=float((params["gloo"] - params["aggbox"]).abs().max()),
                      moved=float((params["gloo"] - init).abs().max()),
                      bounds=state.bucket_bounds and max(state.bucket_bounds.values()),
                      buckets=len(state.bucket_bounds), calls=state.calls, steps=steps)
    state.close()
    return result


def main() -> int:
    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    rank = cfg["rank"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{cfg['master']}", rank=rank,
                            world_size=cfg["world"], timeout=timedelta(seconds=120))
    t0 = time.monotonic()
    try:
        result = {"ok": True, **play(cfg, out)}
    except Exception as exc:  # noqa: BLE001 - written for the test
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    result["elapsed"] = time.monotonic() - t0
    if "start" in CALL:
        result["call_elapsed"] = time.monotonic() - CALL["start"]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # no destroy_process_group: a rank of a failed scenario must not wait for the others
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
