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


def run_ranks(tb: NetnsTestbed, argv_of, ranks=range(WORLD)) -> dict[int, tuple[int, str]]:
    """Start ``argv_of(rank, rendezvous)`` on host ``rank`` for each rank at once; return
    {rank: (exit status, output)} once every process ended."""
    rendezvous = f"tcp://{tb.hosts[0].ip}:{next(_ports)}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    procs = {r: tb.hosts[r].popen(argv_of(r, rendezvous), stdout=subprocess.PIPE,
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


# ------------------------------------------------------------ errors -------------------

INIT = ("import sys, aggbox\n"
        "try:\n"
        "    with aggbox.init({rank}, 3, '{rv}', operations=['allreduce'], {kw}) as ctx:\n"
        "        pass\n"
        "except aggbox.api.AggBoxError as exc:\n"
        "    print('ERROR', type(exc).__name__, exc)\n"
        "    sys.exit(3)\n")


def snippet(**kw: str):
    args = ", ".join(f"{k}={v}" for k, v in kw.items())
    return lambda rank, rv: [sys.executable, "-c", INIT.format(rank=rank, rv=rv, kw=args)]


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
