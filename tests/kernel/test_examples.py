"""examples/*.py on a 3-host netns testbed, each rank started as a user would start it.

Every rank is a process inside its host's namespace (``host.popen``, nsenter) running
the example with ``--rank R --world 3 --rendezvous tcp://<h0>:<port>``: it meets the
others through rank 0's store and installs its own programs (aggbox.init). The results
are checked here, independently of the examples' own checks: broadcast against the
file's bytes on every rank, allreduce against the float64 sum within the bound the
example wrote (and that bound against a magnitude it must not exceed), word count
against collections.Counter over the whole text. Then the errors a user meets: a rank
that never comes, an interface that does not exist, a rank started twice.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from aggbox.collectives.group import Group
from aggbox.errors import AggBoxError
from aggbox.testbed import NetnsTestbed

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
WORLD = 3
WAIT_S = 300  # compiling BCC programs on a loaded 2-CPU machine takes a while
_ports = itertools.count(29400 + os.getpid() % 200 * 2)  # rank 0's store


@pytest.fixture(scope="module")
def tb():
    with NetnsTestbed(WORLD) as testbed:
        yield testbed


def run_ranks(tb: NetnsTestbed, argv_of, ranks=range(WORLD), env_extra: dict | None = None,
              argv_extra: dict[int, list[str]] | None = None) -> dict[int, tuple[int, str]]:
    """Start ``argv_of(rank, rendezvous)`` (plus ``argv_extra[rank]``) on host ``rank``
    for each rank at once; return {rank: (exit status, output)} once every process
    ended."""
    rendezvous = f"tcp://{tb.hosts[0].ip}:{next(_ports)}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), **(env_extra or {}))
    extra = argv_extra or {}
    procs = {r: tb.hosts[r].popen(argv_of(r, rendezvous) + extra.get(r, []),
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
             for r in ranks}
    results = {}
    try:
        for r, p in procs.items():
            results[r] = (p.wait(timeout=WAIT_S), p.stdout.read())
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


GROUP_MAC = Group.group_mac


def assert_nothing_installed(tb: NetnsTestbed) -> None:
    """No TC filter, clsact qdisc or XDP program is left on any host's interface."""
    for h in tb.hosts:
        for hook in ("ingress", "egress"):
            shown = h.run(["tc", "filter", "show", "dev", h.ifname, hook]).stdout
            assert shown.strip() == "", f"{h.name} {hook}: {shown}"
        assert "clsact" not in h.run(["tc", "qdisc", "show", "dev", h.ifname]).stdout
        assert "xdp" not in h.run(["ip", "link", "show", h.ifname]).stdout, h.name


def example(name: str, *extra: str):
    def argv(rank: int, rendezvous: str) -> list[str]:
        return [sys.executable, str(EXAMPLES / name), "--rank", str(rank), "--world",
                str(WORLD), "--rendezvous", rendezvous, *[x.format(rank=rank) for x in extra]]
    return argv


def assert_all_ok(results: dict[int, tuple[int, str]], checking=range(WORLD)) -> None:
    """Every rank exited 0; those in ``checking`` said their own check passed."""
    for r, (status, out) in sorted(results.items()):
        assert status == 0, f"rank {r} exited with {status}:\n{out}"
        assert f"rank {r}:" in out, out
        if r in checking:
            assert out.rstrip().endswith("ok"), out


def test_broadcast_example_delivers_the_exact_bytes_to_every_rank(tb, tmp_path):
    data = random.Random(5).randbytes(200_001)  # 144 packets, the last one short
    (tmp_path / "in.bin").write_bytes(data)
    results = run_ranks(tb, example("broadcast.py", "--file", str(tmp_path / "in.bin"),
                                    "--out", str(tmp_path / "out{rank}.bin")))
    assert_all_ok(results)
    for r in range(WORLD):
        got = (tmp_path / f"out{r}.bin").read_bytes()
        assert len(got) == len(data) and got == data, f"rank {r} got other bytes"
    assert_nothing_installed(tb)


def expected_inputs(seed: int, rank: int, n: int) -> np.ndarray:
    """What examples/allreduce.py gives worker ``rank`` (written out again, on purpose)."""
    return np.random.default_rng([seed, rank]).standard_normal(n, dtype=np.float32)


def test_allreduce_example_is_within_the_bound_of_the_float64_sum(tb, tmp_path):
    n, seed = 50_000, 7
    results = run_ranks(tb, example("allreduce.py", "--floats", str(n), "--seed", str(seed),
                                    "--out", str(tmp_path / "r{rank}.npz")))
    assert_all_ok(results, checking=(1, 2))
    assert "aggregator for workers [1, 2]" in results[0][1]
    exact = sum(expected_inputs(seed, r, n).astype(np.float64) for r in (1, 2))
    for r in (1, 2):
        got = np.load(tmp_path / f"r{r}.npz")
        total, bound = got["total"], got["bound"]
        assert total.dtype == np.float32 and total.shape == (n,)
        err = np.abs(total.astype(np.float64) - exact)
        assert (err <= bound).all(), f"rank {r}: max error {err.max()} over the bound"
        # the bound is not vacuous: float32 rounding of the sum, plus a few ulps more
        assert (bound <= 1e-6 * np.abs(exact).max() + 4e-7 * np.abs(exact)).all()
        assert np.array_equal(got["int_total"], np.arange(1000) * (2 + 3))
    assert np.array_equal(np.load(tmp_path / "r1.npz")["total"],
                          np.load(tmp_path / "r2.npz")["total"]), "workers got one sum"
    assert_nothing_installed(tb)


def test_wordcount_example_counts_exactly(tb, tmp_path):
    rng = random.Random(11)
    vocab = [f"w{i}" for i in range(4000)] + ["x" * 40, "ünïcode", "a"]  # 40: a long key
    lines = [" ".join(rng.choices(vocab, [1 / (i + 1) for i in range(len(vocab))], k=9))
             for _ in range(3000)]
    (tmp_path / "text.txt").write_text("\n".join(lines))
    results = run_ranks(tb, example("wordcount.py", "--text", str(tmp_path / "text.txt"),
                                    "--out", str(tmp_path / "c{rank}.json")))
    assert_all_ok(results)
    shares = [json.loads((tmp_path / f"c{r}.json").read_text()) for r in range(WORLD)]
    assert all(shares), "every rank reduced a share of the words"
    merged: Counter = Counter()
    for share in shares:
        assert not merged.keys() & share.keys(), "a word reduced on two ranks"
        merged.update(share)
    assert merged == Counter(w for line in lines for w in line.split())
    assert_nothing_installed(tb)


# ------------------------------------------------------------ errors -------------------

INIT = """\
import subprocess, sys, aggbox
try:
    with aggbox.init({rank}, 3, '{rv}', {kw}) as ctx:
{body}
except aggbox.api.AggBoxError as exc:
    print('ERROR', type(exc).__name__, exc)
    sys.exit(3)
"""


def snippet(body: str = "pass", argv0: tuple[str, ...] = (), ranks_as: dict | None = None,
            **kw: str):
    """``aggbox.init(rank, 3, rendezvous, **kw)`` and ``body`` inside it, in ``python -c``;
    an AggBoxError is printed as one ``ERROR`` line (exit status 3). ``ranks_as``: rank ->
    argv prefix (e.g. to run it as another user)."""
    kw.setdefault("operations", "['allreduce']")
    args = ", ".join(f"{k}={v}" for k, v in kw.items())
    body = "\n".join("        " + line for line in body.splitlines())

    def argv(rank: int, rv: str) -> list[str]:
        prefix = list((ranks_as or {}).get(rank, argv0))
        return [*prefix, sys.executable, "-c", INIT.format(rank=rank, rv=rv, kw=args,
                                                           body=body)]
    return argv


def error_line(out: str) -> str:
    lines = [x for x in out.splitlines() if x.startswith("ERROR ")]
    assert len(lines) == 1, out
    return lines[0]


def test_a_rank_that_never_comes_is_named(tb):
    results = run_ranks(tb, snippet(setup_timeout="3"), ranks=[0, 1])
    for r in (0, 1):
        status, out = results[r]
        assert status == 3, out
        line = error_line(out)
        assert "rendezvous timeout" in line and "ranks 2 of 3 did not join" in line, line



def test_ranks_given_different_auth_keys_are_refused_before_anything_is_installed(tb):
    """Rank 2 was given another key: every rank stops with one line that says so (the
    ranks compare a check value of the key; the key itself never travels)."""
    results = run_ranks(tb, snippet(setup_timeout="60",
                                    auth_key="sys.argv[1] if len(sys.argv) > 1 else None"),
                        argv_extra={2: ["ab" * 16]},
                        env_extra={"AGGBOX_AUTH_KEY": "cd" * 16})
    for r in (0, 1, 2):
        status, out = results[r]
        assert status == 3, out
        assert "different auth keys" in error_line(out) or "rank 0 failed" in out, out
    assert "rank 2 and rank 0 were given different auth keys" in error_line(results[0][1])
    assert_nothing_installed(tb)


def test_an_authenticated_allreduce_is_within_the_bound(tb, tmp_path):
    """The allreduce example with AGGBOX_AUTH_KEY set on every rank: every block tagged,
    every result's tag checked, the same sums."""
    n, seed = 20_000, 8
    results = run_ranks(tb, example("allreduce.py", "--floats", str(n), "--seed", str(seed),
                                    "--out", str(tmp_path / "r{rank}.npz")),
                        env_extra={"AGGBOX_AUTH_KEY": "5a" * 16})
    assert_all_ok(results, checking=(1, 2))
    exact = sum(expected_inputs(seed, r, n).astype(np.float64) for r in (1, 2))
    for r in (1, 2):
        got = np.load(tmp_path / f"r{r}.npz")
        assert (np.abs(got["total"].astype(np.float64) - exact) <= got["bound"]).all()


def test_an_interface_that_does_not_exist_is_one_line(tb):
    status, out = run_ranks(tb, snippet(iface="'nope0'", setup_timeout="3"), ranks=[1])[1]
    assert status == 3, out
    assert "interface 'nope0' not found" in error_line(out)


def test_a_rank_started_twice_is_refused(tb):
    """Rank 1 on h1 and again on h2: the second one's join is refused, naming it."""
    rendezvous = f"tcp://{tb.hosts[0].ip}:{next(_ports)}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    argv = snippet(setup_timeout="4")
    procs = [tb.hosts[h].popen(argv(rank, rendezvous), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
             for h, rank in ((0, 0), (1, 1), (2, 1))]
    outs = [p.communicate(timeout=WAIT_S)[0] for p in procs]
    assert any("rank 1 joined twice" in o for o in outs), outs


def test_a_rank_that_is_not_root_stops_every_rank_with_its_reason(tb):
    """Rank 1 runs as nobody: it cannot load eBPF and says so in one line; ranks 0 and
    2 (root, programs compiled) stop at once with rank 1's reason, not a timeout."""
    nobody = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")
    results = run_ranks(tb, snippet(operations="['broadcast']", setup_timeout="120",
                                    ranks_as={1: nobody}))
    assert "run as root" in error_line(results[1][1])
    for r in (0, 2):
        status, out = results[r]
        assert status == 3, out
        line = error_line(out)
        assert "rank 1 failed" in line and "run as root" in line, line
    assert_nothing_installed(tb)


def test_broadcast_adds_its_group_neighbour_and_removes_it(tb):
    """An explicit group address the testbed never set up: rank 0 adds the permanent
    neighbour its one send needs, and removes it on close."""
    gip = "10.213.200.1"
    body = ("got = ctx.broadcast(b'hi there' if ctx.rank == 0 else None)\n"
            "print('GOT', got)\n"
            f"print('NEIGH', subprocess.run(['ip', 'neigh', 'show', '{gip}'],"
            " capture_output=True, text=True).stdout.strip())")
    results = run_ranks(tb, snippet(body, operations="['broadcast']",
                                    broadcast_ip=f"'{gip}'"))
    for status, out in results.values():
        assert status == 0 and "GOT b'hi there'" in out, out
    assert f"{gip} dev eth0 lladdr {GROUP_MAC} PERMANENT" in results[0][1]
    assert tb.hosts[0].run(["ip", "neigh", "show", gip]).stdout.strip() == ""
    assert_nothing_installed(tb)


def test_a_broadcast_address_a_rank_uses_is_refused(tb):
    results = run_ranks(tb, snippet(operations="['broadcast']", setup_timeout="20",
                                    broadcast_ip=f"'{tb.hosts[1].ip}'"))
    for status, out in results.values():
        assert status == 3, out
        assert "is rank 1's address" in error_line(out)


def test_env_rendezvous_reads_torchs_variables(monkeypatch):
    from aggbox.api import parse_rendezvous

    monkeypatch.setenv("MASTER_ADDR", "10.9.8.7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_rendezvous("env://", None, None) == ("10.9.8.7", 29500, 2, 4)
    monkeypatch.setenv("AGGBOX_MASTER_PORT", "29501")  # torch's store keeps MASTER_PORT
    assert parse_rendezvous("env://", None, None) == ("10.9.8.7", 29501, 2, 4)
    monkeypatch.delenv("RANK")
    with pytest.raises(AggBoxError, match="RANK"):
        parse_rendezvous("env://", None, None)
    with pytest.raises(AggBoxError, match="rank must be 0..3"):
        parse_rendezvous("tcp://10.9.8.7:1", 4, 4)


def test_a_rank_that_fails_inside_the_block_stops_the_others_with_its_reason(tb):
    """Rank 2 raises inside its ``with`` block: ranks 0 and 1, waiting for it at a
    barrier, fail at once with its reason; nobody waits out a timeout."""
    body = ("if ctx.rank == 2:\n"
            "    raise aggbox.api.AggBoxError('boom on rank 2')\n"
            "ctx.barrier('after-work', timeout=600)")
    results = run_ranks(tb, snippet(body))
    assert "boom on rank 2" in error_line(results[2][1])
    for r in (0, 1):
        status, out = results[r]
        assert status == 3, out
        assert "rank 2 failed: boom on rank 2" in error_line(out), out
    assert_nothing_installed(tb)


ALL_THREE = """\
import numpy as np
from collections import Counter
cfg = ctx.broadcast(b'lr=0.1' if ctx.rank == 0 else None)
back = ctx.broadcast(b'from one' if ctx.rank == 1 else None, root=1)
total = None if ctx.is_aggregator else ctx.allreduce(np.arange(10, dtype=np.int32) + ctx.rank)
counts = ctx.reduce_by_key(Counter({b'all': 1, b'rank%d' % ctx.rank: ctx.rank + 10}))
print('RESULT', cfg, back, None if total is None else total.tolist(), sorted(counts.items()))
"""


def test_all_three_operations_in_one_context(tb):
    """The default init: the three program families side by side on each host (the
    aggregator's too), two broadcast roots, an allreduce and a reduce-by-key."""
    results = run_ranks(tb, snippet(ALL_THREE, operations="aggbox.api.OPERATIONS"))
    from aggbox.collectives.reduce import reducer_of

    keys = {b"all": 3, b"rank0": 10, b"rank1": 11, b"rank2": 12}
    for r, (status, out) in results.items():
        assert status == 0, out
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert line, out
        total = "None" if r == 0 else str([2 * i + 3 for i in range(10)])  # ranks 1 + 2
        mine = sorted((k, v) for k, v in keys.items() if reducer_of(k, WORLD) == r)
        assert line[0] == f"RESULT b'lr=0.1' b'from one' {total} {mine}", out
    assert_nothing_installed(tb)
