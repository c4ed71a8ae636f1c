"""An allreduce worker for the kernel tests: one process per worker host, driven over stdin.

The process lives in its host's network namespace (started with ``host.popen``) and holds
any number of :class:`Allreducer` objects by name (one per job it takes part in). Workers
load no eBPF program, so starting one is cheap; the aggregator's programs are held by the
test process itself. It prints ``{"ok": true, "event": "ready"}`` and then answers one
JSON line per command line:

    {"cmd": "reducer", "name": "a", "group": {...}, "block": 256, "timeout": 10,
     "scale": "align", "first_seq": 0}                  Allreducer(group, ...)
    {"cmd": "run", "name": "a", "calls": [call, ...]}   the calls one after the other
    {"cmd": "parallel", "runs": [{"name": "a", "calls": [...]}, ...]}
                                                        each run in its own thread, at once
    {"cmd": "stats", "name": "a"} / {"cmd": "close", "name": "a"} / {"cmd": "quit"}

A call is ``{"kind": "int32" | "reduce_int32" | "max_int32" | "float", "size": n,
"seed": s, "dist": "gaussian", "poison": [index, "nan" | "inf"]}``: the worker makes its
input with :func:`int32_input` / :func:`negative_input` (max_int32: the in-kernel MAX) /
:func:`float_input` (the test makes the same to compute the reference) and answers
``{"result": <base64>, "dtype": ..., "bound": <base64>}``, the bound being
``Allreducer.error_bound`` for float calls.

Failures are answered, not raised: ``{"ok": false, "error": "CollectiveTimeout",
"message": ..., "missing": [...], "elapsed": seconds, "stats": {...}}``. The test side
is :class:`WorkerProcess`.

    python tests/kernel/allreduce_node.py
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
from node_client import NodeClient

DISTRIBUTIONS = ("uniform", "gaussian", "heavy", "zeros", "small")


def int32_input(rank: int, size: int, seed: int) -> np.ndarray:
    """Worker ``rank``'s int32 vector: the whole int32 range, so sums wrap."""
    rng = np.random.default_rng([seed, rank, 32])
    return rng.integers(-(2**31), 2**31, size, dtype=np.int64).astype(np.int32)


def negative_input(rank: int, size: int, seed: int) -> np.ndarray:
    """Worker ``rank``'s all-negative int32 vector (-2**31 .. -1): the MAX test's input."""
    rng = np.random.default_rng([seed, rank, 33])
    return rng.integers(-(2**31), 0, size, dtype=np.int64).astype(np.int32)


def float_input(rank: int, size: int, dist: str, seed: int) -> np.ndarray:
    """Worker ``rank``'s float32 vector drawn from ``dist``."""
    rng = np.random.default_rng([seed, rank, 64])
    if dist == "uniform":
        x = rng.uniform(-1.0, 1.0, size)
    elif dist == "gaussian":
        x = rng.standard_normal(size)
    elif dist == "heavy":  # Student's t, 1.5 degrees of freedom: infinite variance
        x = rng.standard_t(1.5, size)
    elif dist == "zeros":
        x = np.zeros(size)
    elif dist == "small":  # gradient-like magnitudes: every block's exponent is negative
        x = rng.standard_normal(size) * 1e-3
    elif dist == "sparse":  # half the ranks send all-zero blocks where the others do not
        x = rng.standard_normal(size)
        half = size // 2
        if rank % 2:
            x[:half] = 0.0
        else:
            x[half:] = 0.0
    elif dist == "scales":  # each rank 10 bits below the one before: every shift, and
        x = rng.standard_normal(size) * 1e-3 ** rank  # some past the 30-bit headroom
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return x.astype(np.float32)


def encode(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def decode(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.dtype(dtype))


# ----------------------------------------------------------------- the node side -------


class _Node:
    def __init__(self) -> None:
        self.reducers: dict[str, object] = {}

    def reducer(self, name: str, group: dict, block: int = 256, timeout: float = 10.0,
                scale: str = "align", rto: float = 0.02, first_seq: int = 0,
                io: str = "c") -> dict:
        """``first_seq``: the seq of the first block (a job that has run for a long time:
        next to the 32-bit wrap); ``io``: "c" (edge.c's socket loops, the default where
        it builds: required then) or "python" (the fallback's)."""
        from aggbox import native
        from aggbox.collectives.allreduce import Allreducer
        from aggbox.collectives.group import Group

        self.close(name)
        reducer = Allreducer(Group.from_dict(group), block=block, timeout=timeout, rto=rto,
                             scale=scale)
        reducer.next_seq = first_seq
        if io == "python":
            reducer._io = None
        elif reducer.key is None and reducer._io is None:
            raise RuntimeError(f"edge.c's socket loops are off: {native.unavailable_reason}")
        self.reducers[name] = reducer
        return {}

    def _call(self, reducer, call: dict) -> dict:
        rank = reducer.group.rank
        kind = call["kind"]
        if kind in ("int32", "reduce_int32"):
            x = int32_input(rank, call["size"], call["seed"])
            y = reducer.allreduce(x) if kind == "int32" else reducer.reduce_int32(x)
            return {"result": encode(y), "dtype": str(y.dtype)}
        if kind == "max_int32":
            y = reducer.reduce_int32(negative_input(rank, call["size"], call["seed"]),
                                     op_max=True)
            return {"result": encode(y), "dtype": str(y.dtype)}
        x = float_input(rank, call["size"], call.get("dist", "gaussian"), call["seed"])
        if call.get("poison"):
            index, what = call["poison"]
            x[index] = np.nan if what == "nan" else np.inf
        y = reducer.allreduce(x)
        return {"result": encode(y), "dtype": str(y.dtype),
                "bound": encode(reducer.error_bound(y).astype(np.float64))}

    def run(self, name: str, calls: list[dict]) -> dict:
        reducer = self.reducers[name]
        results = []
        for call in calls:
            t0 = time.monotonic()
            try:
                results.append(self._call(reducer, call))
            except Exception as exc:
                exc.elapsed = time.monotonic() - t0  # how long the failing call took
                exc.stats = dict(reducer.stats)
                exc.done = len(results)
                raise
        return {"results": results, "stats": dict(reducer.stats)}

    def parallel(self, runs: list[dict]) -> dict:
        """Each run in its own thread, all at once; the answers in order."""
        answers: list = [None] * len(runs)

        def go(k: int, run: dict) -> None:
            try:
                answers[k] = {"ok": True, **self.run(**run)}
            except Exception as exc:  # noqa: BLE001 - reported to the test
                answers[k] = _failure(exc)

        threads = [threading.Thread(target=go, args=(k, r)) for k, r in enumerate(runs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"runs": answers}

    def stats(self, name: str) -> dict:
        return {"stats": dict(self.reducers[name].stats)}

    def close(self, name: str) -> dict:
        reducer = self.reducers.pop(name, None)
        if reducer is not None:
            reducer.close()
        return {}

    def quit(self) -> dict:
        for name in list(self.reducers):
            self.close(name)
        return {}


def _failure(exc: Exception) -> dict:
    reply = {"ok": False, "error": type(exc).__name__, "message": str(exc),
             "missing": getattr(exc, "missing", None), "elapsed": getattr(exc, "elapsed", None),
             "stats": getattr(exc, "stats", None), "done": getattr(exc, "done", None)}
    return reply


def _answer(reply: dict) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def main() -> int:
    node = _Node()
    try:
        _answer({"ok": True, "event": "ready", "pid": os.getpid()})
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            cmd = request.pop("cmd")
            try:
                reply = {"ok": True, **getattr(node, cmd)(**request)}
            except Exception as exc:  # noqa: BLE001 - reported to the test
                reply = _failure(exc)
            _answer(reply)
            if cmd == "quit":
                return 0
    finally:
        node.quit()
    return 0


# ----------------------------------------------------------------- the test side -------


class WorkerProcess(NodeClient):
    """A running ``allreduce_node.py`` on one host; ``call`` sends a command and waits."""

    def __init__(self, host, stderr_dir: Path, tag: str = ""):
        super().__init__(host, __file__, [], stderr_dir / f"{host.name}{tag}.stderr")



if __name__ == "__main__":
    sys.exit(main())
