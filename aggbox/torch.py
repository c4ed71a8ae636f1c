"""AggBox under PyTorch DDP: a communication hook that averages gradient buckets in the
aggregator's kernel.

    import torch.distributed as dist
    from aggbox.torch import AggBoxState, allreduce_hook

    dist.init_process_group("gloo", ...)            # DDP keeps its own process group
    state = AggBoxState.from_process_group(None, aggregator="10.0.0.1")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(state, allreduce_hook)

and on the aggregator host, once (it holds the eBPF programs and installs the job)::

    python -m aggbox.torch aggregator --master <rank 0's address>:<port> --ifname eth0

How the job is agreed: every rank publishes its own address and MAC (those of the
interface that routes to the aggregator) in the process group's store; rank 0 draws the
job id and token with :mod:`secrets` and publishes the whole group; the aggregator host
reads it from the same store (as one more store client), installs the job and says so;
every rank then waits for that word and probes the kernel path with a one-value call, so
a missing or detached aggregator is one clear error at start-up, not a hang in step 1.

The hook averages (``mean``) each bucket: float32 buckets are handed to the quantizer as
``tensor.numpy()`` (the same memory, no copy); float16 and bfloat16 buckets are widened
to float32 (numpy has no bfloat16), averaged, and rounded back to the bucket's dtype,
which the bound accounts for. ``state.last_error_bound`` is the per-element bound of the
last bucket (``aggbox.quant``'s bound of the sum, divided by the group size, plus the
roundings of the division and of the cast back). A bucket with NaN or Inf is refused
before anything is sent, naming the bucket; a rank that stops answering makes every
other rank's call fail within ``timeout`` seconds, naming it.

Authenticated jobs: give every rank and the aggregator host the same 16-byte key
(``auth_key=`` or the environment's ``AGGBOX_AUTH_KEY``, 32 hex digits). The key never
goes through the store: each side publishes a check value of it (a tag of a header of
zeros), rank 0 names the ranks whose key differs from its own, and the aggregator refuses
to install a job whose check value is not its own; either way every rank fails at start-up
with that one message.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import json
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from aggbox import auth
from aggbox.collectives.allreduce import DEFAULT_PORTS, Allreducer, make_group, max_block
from aggbox.collectives.group import Group, Member
from aggbox.errors import AggBoxError, CollectiveTimeout
from aggbox.quant import QuantizationError
from aggbox.quant import _split as quant_split  # full blocks as rows, and the short tail

STORE_PREFIX = "aggbox"
INSTALLED = "installed"  # the aggregator's answer: "1", or {"error": ...} (JSON)
AUTH = "auth"  # rank 0's key check value and the ranks whose key differs (JSON)
KEY_ADVICE = ("give every rank and the aggregator host the same AGGBOX_AUTH_KEY "
              "(32 hex digits), or none of them one")
SIOCGIFADDR, SIOCGIFHWADDR, SIOCGIFMTU = 0x8915, 0x8927, 0x8921
# Relative half-ulp of the dtypes a bucket may have: the rounding of the cast back.
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# The smallest positive subnormal's half (the absolute floor of a rounding), per dtype.
ABS_FLOOR = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}


def interface_to(ip: str) -> tuple[str, str, str]:
    """``(ifname, own ip, own mac)`` of the interface this host reaches ``ip`` through.

    The route is the kernel's (a connected UDP socket sends nothing); the MAC comes from
    an ioctl, which answers for the caller's network namespace (/sys may show another).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
        except OSError as exc:
            raise AggBoxError(f"no route to the AggBox aggregator {ip}: {exc}; check its "
                              "address") from exc
        own = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
            except OSError:
                continue
            if addr == own:
                hw = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, req)[18:24]
                return name, own, ":".join(f"{b:02x}" for b in hw)
    raise AggBoxError(f"no interface holds {own}, the address that routes to {ip}")


def interface_mtu(ifname: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16si", ifname.encode()[:15], 0)
        return struct.unpack("16si", fcntl.ioctl(s.fileno(), SIOCGIFMTU, req))[1]


def _prefix_store(store: dist.Store, name: str) -> dist.Store:
    # The keys live in the underlying store (rank 0's TCPStore) under our own prefix, not
    # under torch's per-group prefixes (internal, they changed between versions): the
    # aggregator host, a plain client of that store, finds them from the name alone.
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return dist.PrefixStore(f"{STORE_PREFIX}/{name}", store)


def _fail_together(kv: dist.Store, rank: int, size: int, timeout_s: float,
                   message: str) -> None:
    """Raise the start-up error every rank found, rank 0 last: its process holds the
    store, so a rank 0 that went first would leave the others a "connection reset" from
    the store instead of the message. Rank 0 waits (at most ``timeout_s``) until every
    other rank said it has read what it needed."""
    kv.set(f"failed/{rank}", "1")
    if rank == 0 and size > 1:
        with contextlib.suppress(RuntimeError):  # a rank that died: raise anyway
            kv.wait([f"failed/{r}" for r in range(1, size)], timedelta(seconds=timeout_s))
    raise AggBoxError(message)


def _get(store: dist.Store, key: str, timeout_s: float) -> dict:
    store.set_timeout(timedelta(seconds=timeout_s))
    return json.loads(store.get(key).decode())


@dataclass
class AggBoxState:
    """What the hook needs: this rank's :class:`Allreducer` and the last call's bound."""

    reducer: Allreducer
    group: Group
    timeout: float
    last_error_bound_max: float = float("nan")  # the largest of last_error_bound
    bucket_bounds: dict[int, float] = field(default_factory=dict)  # bucket -> max bound
    comm_ns: int = 0  # time the worker thread spent on buckets, summed
    calls: int = 0
    failed: BaseException | None = None  # the first bucket that failed: later ones refused
    _worker: concurrent.futures.ThreadPoolExecutor | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # what the last bucket's per-element bound is computed from, when it is asked for
    _last: tuple | None = field(default=None, repr=False)

    @property
    def last_error_bound(self) -> torch.Tensor | None:
        """Per element, the bound of the last bucket's mean (shaped like the bucket).
        Computed when read, from that call's sums: in float64 over every element it took
        longer than the allreduce itself (42 ms for 3.2 M values), on every bucket."""
        if self._last is None:
            return None
        total, mean, exponents, dtype, shape = self._last
        bound = _mean_bound(self, total, mean, exponents, dtype)
        return torch.from_numpy(bound).reshape(shape)

    @classmethod
    def from_process_group(cls, pg: dist.ProcessGroup | None, aggregator: str,
                           store: dist.Store | None = None, name: str = "ddp",
                           port: int = DEFAULT_PORTS[0], block: int = 0,
                           timeout: float = 20.0, setup_timeout: float = 60.0,
                           probe: bool = True, auth_key: bytes | str | None = None
                           ) -> AggBoxState:
        """Agree on the AggBox job with the other ranks of ``pg`` (None: the default
        group) through its store, wait for the aggregator host at ``aggregator`` (an
        IPv4 address) to install it, and probe the kernel path once.

        ``store`` defaults to the default group's store (the one ``init_process_group``
        made); every rank passes the same ``name``, and so does the aggregator host.
        ``block``: values per packet (0: the most the interface's MTU carries).
        ``timeout``: a call that makes no progress that long fails.
        ``auth_key``: 16 bytes or 32 hex digits (default: the environment's
        ``AGGBOX_AUTH_KEY``; none: an unauthenticated job); every rank and the aggregator
        host need the same one.
        """
        if pg is None:
            pg = dist.group.WORLD
        rank, size = dist.get_rank(pg), dist.get_world_size(pg)
        if store is None:
            store = dist.distributed_c10d._get_process_group_store(pg)
        kv = _prefix_store(store, name)
        key_hex = auth.key_hex(auth_key)
        check = auth.check_value(key_hex)
        ifname, ip, mac = interface_to(aggregator)
        kv.set(f"member/{rank}", json.dumps({"ip": ip, "mac": mac, "auth": check}))
        if rank == 0:
            # a fresh job id and token per group: the kernel keeps concurrent jobs apart by
            # both, and a token nobody can guess keeps strangers' packets out of the sums
            job = {"job_id": secrets.randbelow(2**31 - 1) + 1,
                   "token": secrets.randbelow(2**32 - 1) + 1}
            members = [dict(_get(kv, f"member/{r}", setup_timeout), rank=r)
                       for r in range(size)]
            # (published before the group: a rank that reads the group finds it)
            kv.set(AUTH, json.dumps({"check": check, "differ": [
                m["rank"] for m in members if m.pop("auth", "") != check]}))
            # the group as published holds no key: each side adds its own
            group = make_group(job["job_id"], job["token"],
                               [Member(**m) for m in members],
                               Member(0, aggregator), rank=0, port=port, ifname=ifname)
            kv.set("group", group.to_json())
        kv.set_timeout(timedelta(seconds=setup_timeout))
        try:
            group = Group.from_json(kv.get("group").decode()).with_rank(rank)
        except RuntimeError as exc:
            raise AggBoxError(f"rank {rank}: rank 0 published no AggBox group within "
                              f"{setup_timeout:g} s ({exc})") from exc
        differ = json.loads(kv.get(AUTH).decode())["differ"]
        if differ:
            _fail_together(kv, rank, size, setup_timeout,
                           f"rank {rank}: rank(s) {', '.join(map(str, differ))} were given "
                           f"a different auth key than rank 0: {KEY_ADVICE}")
        group = replace(group, auth_key=key_hex)
        try:
            kv.wait([INSTALLED], timedelta(seconds=setup_timeout))
        except RuntimeError:
            raise AggBoxError(
                f"no AggBox aggregator installed job {group.job_id} within "
                f"{setup_timeout:g} s: run `python -m aggbox.torch aggregator --master "
                f"<rank 0's store address> --ifname <its interface> --name {name}` on the "
                f"aggregator host {aggregator}") from None
        answer = kv.get(INSTALLED).decode()
        if answer != "1":
            _fail_together(kv, rank, size, setup_timeout,
                           f"rank {rank}: {json.loads(answer)['error']}")
        block = block or max_block(interface_mtu(ifname), bool(key_hex))
        reducer = Allreducer(group, block=block, timeout=min(timeout, 5.0) if probe else timeout)
        state = cls(reducer, group, timeout)
        if probe:
            try:
                reducer.allreduce(np.zeros(1, dtype=np.float32))
            except CollectiveTimeout as exc:
                reducer.close()
                raise AggBoxError(
                    f"the AggBox aggregator {aggregator} installed the job but its kernel "
                    f"did not answer a probe ({exc}); are its programs still attached "
                    f"(`python -m aggbox.torch aggregator` running)?") from exc
            reducer.timeout = timeout
        return state

    def submit(self, fn, *args) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on this state's one worker thread, after the buckets queued
        before it (one thread: the ranks must send their buckets in the same order, and
        the reducer's socket is not shared)."""
        with self._lock:
            if self._worker is None:
                self._worker = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"aggbox-hook-r{self.group.rank}")
            return self._worker.submit(fn, *args)

    def close(self) -> None:
        """Wait for the buckets in flight, stop the worker thread, close the socket."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True, cancel_futures=True)
        self.reducer.close()


def _mean_bound(state: AggBoxState, total: np.ndarray, mean: np.ndarray,
                exponents: np.ndarray, dtype: torch.dtype, block: int | None = None
                ) -> np.ndarray:
    """Per element, |mean returned - exact mean of the ranks' bucket values|; ``block``:
    the values per exponent (default: the reducer's; 1 for one value per block)."""
    n = state.group.size
    absmean = np.abs(mean, dtype=np.float64)
    # the sum's bound, the float32 division (relative, or absolute for a subnormal mean),
    # then the rounding to the bucket's dtype
    sum_bound = state.reducer.error_bound(total, exponents, block)
    bound = sum_bound / n + absmean * 2.0**-24 + ABS_FLOOR[torch.float32]
    if dtype != torch.float32:
        bound = bound + (absmean + bound) * HALF_ULP[dtype] + ABS_FLOOR[dtype]
    return bound


def _mean_bound_max(state: AggBoxState, total: np.ndarray, mean: np.ndarray,
                    exponents: np.ndarray, dtype: torch.dtype) -> float:
    """The largest element of _mean_bound, from one value per block: within a block every
    term of the bound grows with |sum| (the mean is the sum over n, rounded: monotone), so
    the largest is at the block's largest |sum|; the same arithmetic on those values
    gives the same number, for a float32 pass over the sums instead of float64 ones."""
    if total.size == 0:
        return 0.0
    block = state.reducer.block
    at = _largest_per_block(total, block)
    exps = None if exponents is None else exponents[: at.size]
    return float(_mean_bound(state, total[at], mean[at], exps, dtype, 1).max())


def _largest_per_block(x: np.ndarray, block: int) -> np.ndarray:
    """Per block of ``x``, the index of a value of the largest magnitude: the block's
    argmax or argmin, whichever is further from 0 (two passes, no |x| array)."""
    rows, tail = quant_split(x, block)
    hi, lo = rows.argmax(axis=1), rows.argmin(axis=1)
    base = np.arange(rows.shape[0]) * block
    at = np.where(np.abs(x[base + hi]) >= np.abs(x[base + lo]), hi, lo) + base
    if tail.size:
        t = int(tail.argmax()) if abs(tail.max()) >= abs(tail.min()) else int(tail.argmin())
        at = np.append(at, rows.size + t)
    return at


def allreduce_hook(state: AggBoxState, bucket: dist.GradBucket
                   ) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean of the bucket over the group, in the kernel.

    Register with ``ddp.register_comm_hook(state, allreduce_hook)``. Returns at once: the
    bucket is averaged on the state's worker thread (buckets in the order DDP hands them
    over) while backward goes on computing the next buckets' gradients; the future is
    completed with the mean, or with the error (naming the bucket and the rank), which
    DDP raises from ``backward()`` instead of taking a wrong step. After a failed bucket
    the state refuses the next ones at once (the ranks' buckets are out of step).
    """
    buf = bucket.buffer()
    index = bucket.index()
    if buf.dtype not in HALF_ULP:
        raise AggBoxError(f"gradient bucket {index}: dtype {buf.dtype} is not supported "
                          "(float32, float16, bfloat16)")
    if buf.device.type != "cpu":
        raise AggBoxError(f"gradient bucket {index} is on {buf.device}: AggBox aggregates "
                          "CPU tensors; train on CPU or copy the bucket")
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    state.submit(_average_into_future, state, buf, index, fut)
    return fut


def _average_into_future(state: AggBoxState, buf: torch.Tensor, index: int,
                         fut: torch.futures.Future) -> None:
    """The worker thread's part: the bucket's mean, or its error, into ``fut``."""
    try:
        if state.failed is not None:
            raise AggBoxError(f"gradient bucket {index} was not sent on rank "
                              f"{state.group.rank}: an earlier bucket failed "
                              f"({state.failed}); build a new AggBoxState")
        out = _average(state, buf, index)
    except BaseException as exc:  # noqa: BLE001 - every failure goes to DDP via the future
        if state.failed is None:
            state.failed = exc
        if not isinstance(exc, AggBoxError):  # a bug or an OSError: still name the bucket
            exc = AggBoxError(f"AggBox allreduce of gradient bucket {index} failed on rank "
                              f"{state.group.rank}: {type(exc).__name__}: {exc}")
        fut.set_exception(exc)
        return
    fut.set_result(out)


def _average(state: AggBoxState, buf: torch.Tensor, index: int) -> torch.Tensor:
    """The mean of one bucket over the group (on the worker thread), and its bound."""
    t0 = time.perf_counter_ns()
    dtype = buf.dtype
    flat = buf.reshape(-1)
    # float32: numpy's view of the bucket's own memory (no copy); else a float32 copy
    x = flat.numpy() if dtype == torch.float32 else flat.to(torch.float32).numpy()
    try:
        # NaN/Inf are refused by the quantizer from its block peaks, before anything is
        # sent (a torch.isfinite pass of its own was a quarter of a rank's time)
        total = state.reducer.allreduce(x, op="sum")
    except QuantizationError as exc:
        bad = int(x.size - np.isfinite(x).sum())
        if not bad:
            raise
        raise AggBoxError(f"gradient bucket {index} holds {bad} NaN/Inf value(s) on rank "
                          f"{state.group.rank}: nothing was sent; lower the learning rate or "
                          "clip gradients (the other ranks will time out waiting for it)"
                          ) from exc
    except CollectiveTimeout as exc:
        raise CollectiveTimeout(f"AggBox allreduce of gradient bucket {index} "
                                f"({flat.numel()} values) failed on rank "
                                f"{state.group.rank}: {exc}", exc.missing) from exc
    mean = np.divide(total, np.float32(state.group.size), dtype=np.float32)
    out = torch.from_numpy(mean)  # shares mean's memory
    if dtype != torch.float32:
        out = out.to(dtype)
    exponents = getattr(state.reducer, "last_exponents", None)
    state._last = (total, mean, exponents, dtype, buf.shape)
    state.last_error_bound_max = _mean_bound_max(state, total, mean, exponents, dtype)
    state.bucket_bounds[index] = max(state.bucket_bounds.get(index, 0.0),
                                     state.last_error_bound_max)
    state.comm_ns += time.perf_counter_ns() - t0
    state.calls += 1
    return out.reshape(buf.shape)


# DDP checks the hook's annotations against the objects themselves; postponed annotations
# (this module's __future__ import) would be strings it refuses.
allreduce_hook.__annotations__.update(bucket=dist.GradBucket,
                                      **{"return": torch.futures.Future[torch.Tensor]})


# ----------------------------------------------------------------- aggregator side -----


def aggregator_store(master: str, timeout_s: float = 300.0) -> dist.Store:
    """A client of the process group's store at ``host:port`` (rank 0's MASTER_ADDR and
    MASTER_PORT)."""
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise AggBoxError(f"--master must be host:port, got {master!r}")
    return dist.TCPStore(host, int(port), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def install_from_store(programs, store: dist.Store, name: str = "ddp",
                       timeout_s: float = 300.0, auth_key: bytes | str | None = None
                       ) -> Group:
    """Aggregator side: wait for rank 0's group, install it on ``programs``
    (:class:`AggregatorPrograms`), and tell the ranks it is in. ``auth_key`` (default: the
    environment's ``AGGBOX_AUTH_KEY``) must be the ranks' own: a job whose key differs
    is not installed, and the ranks are told why."""
    kv = _prefix_store(store, name)
    kv.set_timeout(timedelta(seconds=timeout_s))
    group = Group.from_json(kv.get("group").decode())
    key_hex = auth.key_hex(auth_key)
    if json.loads(kv.get(AUTH).decode())["check"] != auth.check_value(key_hex):
        error = (f"the aggregator host was given a different auth key than rank 0 "
                 f"(job {group.job_id} not installed): {KEY_ADVICE}")
        kv.set(INSTALLED, json.dumps({"error": error}))
        raise AggBoxError(error)
    _, ip, mac = interface_to(group.members[0].ip)
    agg = Member(0, ip, mac)  # the workers named the address; the MAC is this host's
    group = make_group(group.job_id, group.token, list(group.members), agg, rank=0,
                       port=group.port, ifname=group.ifname, auth_key=key_hex)
    programs.install_job(group)
    kv.set(INSTALLED, "1")
    return group


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggbox.torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("aggregator", help="hold AggBox's programs and install the DDP job")
    a.add_argument("--master", required=True, help="rank 0's store: MASTER_ADDR:MASTER_PORT")
    a.add_argument("--ifname", default="eth0", help="the interface the workers reach")
    a.add_argument("--name", default="ddp", help="the name the ranks passed")
    a.add_argument("--timeout", type=float, default=300.0)
    # (the key comes from the environment, as the ranks' does: an argument would show in
    # the process list)
    a.add_argument("--pin-tag", default="", help="pin the maps under aggbox/<tag>-* "
                   "(several aggregators on one machine, e.g. tests)")
    args = parser.parse_args(argv)
    import signal

    from aggbox.collectives.allreduce import AggregatorPrograms

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with AggregatorPrograms(args.ifname, pin_tag=args.pin_tag) as programs:
            group = install_from_store(programs, aggregator_store(args.master, args.timeout),
                                       args.name, args.timeout)
            print(f"aggbox: job {group.job_id} installed for {group.size} ranks; "
                  "Ctrl-C to detach", flush=True)
            while True:
                signal.pause()
    except AggBoxError as exc:
        print(f"aggbox: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
