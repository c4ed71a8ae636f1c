"""aggbox.torch on the real kernel: the DDP hook's means, dtypes, failures and a real DDP run.

One testbed for the module (MTU 65000, 16 Ki-value blocks): h0 is the aggregator, whose
:class:`AggregatorPrograms` the test process holds; each test starts one process per
rank (tests/kernel/torch_rank.py) on h1..h3, a gloo process group among them, and a
thread inside h0 that reads the job from the group's store and installs it, as
``python -m aggbox.torch aggregator`` does on a real aggregator host.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_rank import bucket_input

from aggbox.collectives.allreduce import AggregatorPrograms
from aggbox.testbed import NetnsTestbed

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
HOSTS = 4  # h0 the aggregator, h1..h3 ranks
_ports = itertools.count(29700)


@pytest.fixture(scope="module")
def box():
    with NetnsTestbed(HOSTS, mtu=65000) as tb:
        agg = tb.hosts[0]
        programs = agg.call(lambda: AggregatorPrograms(agg.ifname, pin_tag=f"th{os.getpid()}"))
        try:
            yield tb, programs
        finally:
            agg.call(programs.close)


def run_ranks(box, tmp_path: Path, world: int, scenario: str, install: bool = True,
              wait: float = 180.0, agg_key: str = "", installed: list | None = None,
              **cfg) -> list[dict]:
    """Every rank of one scenario, and (``install``) the aggregator's store client with
    ``agg_key`` (what it installed, or the error it raised, goes to ``installed``)."""
    from aggbox.torch import aggregator_store, install_from_store

    tb, programs = box
    master = f"{tb.hosts[1].ip}:{next(_ports)}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="eth0",
               PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]))
    procs = []
    for rank in range(world):
        conf = dict(cfg, rank=rank, world=world, master=master, scenario=scenario,
                    aggregator=tb.hosts[0].ip, out=str(tmp_path))
        err = open(tmp_path / f"rank{rank}.stderr", "wb")  # noqa: SIM115 - closed below
        procs.append((tb.hosts[1 + rank].popen(
            [sys.executable, str(Path(__file__).parent / "torch_rank.py"), json.dumps(conf)],
            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO), err))
    installed = [] if installed is None else installed

    def serve() -> None:
        try:
            installed.append(tb.hosts[0].call(
                lambda: install_from_store(programs, aggregator_store(master, 60), "ddp", 60,
                                           auth_key=agg_key)))
        except Exception as exc:  # noqa: BLE001 - the ranks report what it caused
            installed.append(exc)

    server = threading.Thread(target=serve, daemon=True)
    if install:
        server.start()
    try:
        for proc, _ in procs:
            proc.wait(wait)
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
        if install:
            server.join(10)
            for g in installed:
                if not isinstance(g, Exception):
                    programs.remove_job(g.job_id)
    out = []
    for rank in range(world):
        path = tmp_path / f"rank{rank}.json"
        if not path.exists():
            out.append({"ok": None, "stderr": (tmp_path / f"rank{rank}.stderr").read_text()})
        else:
            out.append(json.loads(path.read_text()))
    return out


def check_means(tmp_path: Path, results: list[dict], world: int,
                buckets: list[tuple], seed: int) -> None:
    for r in results:
        assert r["ok"], r
    for k, (size, dtype, *scale) in enumerate(buckets):
        ref = sum(bucket_input(r, size, dtype, seed, *scale).to(torch.float64).numpy()
                  for r in range(world)) / world
        first = None
        for rank in range(world):
            y = np.load(tmp_path / f"rank{rank}-{k}.npy").astype(np.float64)
            bound = np.load(tmp_path / f"rank{rank}-{k}-bound.npy")
            assert y.shape == (size,)
            err = np.abs(y - ref)
            assert (err <= bound).all(), (size, dtype, float(err.max()),
                                          float(bound[np.argmax(err - bound)]))
            if first is None:
                first = y
            assert np.array_equal(first, y), "every rank takes the same step"
        assert results[0]["dtypes"][k] == f"torch.{dtype}"


@pytest.mark.parametrize("world", [2, 3])
def test_mean_within_bound_for_any_bucket_size(box, tmp_path, world):
    buckets = [(1, "float32"), (257, "float32"), (1_000_003, "float32")]
    results = run_ranks(box, tmp_path, world, "buckets", buckets=buckets, seed=world)
    check_means(tmp_path, results, world, buckets, world)
    for r in results:
        assert r["group_size"] == world
        assert all(r["shares"]), "float32 buckets go to the quantizer without a copy"


def test_half_precision_buckets(box, tmp_path):
    buckets = [(257, "float16"), (100_003, "float16"), (257, "bfloat16"),
               (100_003, "bfloat16")]
    results = run_ranks(box, tmp_path, 2, "buckets", buckets=buckets, seed=7)
    check_means(tmp_path, results, 2, buckets, 7)


def test_tiny_gradients_down_to_subnormals_are_within_the_bound(box, tmp_path):
    """Buckets around 1e-31 .. 1e-41: their scales do not fit float32 (the quantizer
    clipped them and returned such means 2-4x off while the bound said 1e-9 relative)."""
    buckets = [(1000, "float32", 1e-28), (1000, "float32", 1e-32), (1000, "float32", 1e-35),
               (1000, "float32", 1e-38)]
    results = run_ranks(box, tmp_path, 2, "buckets", buckets=buckets, seed=11)
    check_means(tmp_path, results, 2, buckets, 11)


def test_a_rank_that_dies_mid_step_fails_the_others_within_the_timeout(box, tmp_path):
    results = run_ranks(box, tmp_path, 3, "die", victim=2, seed=1, timeout=3.0)
    for rank in (0, 1):
        r = results[rank]
        assert r["ok"] is False and r["error"] == "CollectiveTimeout", r
        assert "bucket 3" in r["message"] and "rank 2" in r["message"], r["message"]
        assert r["call_elapsed"] < 3.0 + 5.0, r


def test_nan_in_a_bucket_is_refused_naming_it(box, tmp_path):
    results = run_ranks(box, tmp_path, 2, "nan", victim=1, seed=1, timeout=3.0)
    bad = results[1]
    assert bad["ok"] is False and bad["error"] == "AggBoxError", bad
    assert "gradient bucket 3" in bad["message"] and "NaN" in bad["message"]
    assert bad["call_elapsed"] < 1.0, "refused before anything is sent"
    other = results[0]
    assert other["ok"] is False and "rank 1" in other["message"], other


def test_missing_aggregator_is_one_clear_error(box, tmp_path):
    results = run_ranks(box, tmp_path, 1, "setup", install=False, setup_timeout=2)
    r = results[0]
    assert r["ok"] is False and r["error"] == "AggBoxError", r
    assert "python -m aggbox.torch aggregator" in r["message"], r["message"]
    assert "\n" not in r["message"]


def test_an_authenticated_job_averages_within_the_bound(box, tmp_path):
    """Every rank and the aggregator given one key: the job is installed keyed (the
    kernel takes only tagged blocks) and the means are right; the key never went through
    the store, which only saw its check value."""
    from aggbox import auth

    key = auth.new_key().hex()
    buckets = [(1, "float32"), (100_003, "float32"), (257, "bfloat16")]
    installed: list = []
    results = run_ranks(box, tmp_path, 2, "buckets", buckets=buckets, seed=5,
                        keys=[key, key], agg_key=key, installed=installed)
    check_means(tmp_path, results, 2, buckets, 5)
    assert all(r["authenticated"] for r in results)
    assert len(installed) == 1 and installed[0].auth_key == key, installed


def test_ranks_with_different_keys_all_fail_at_start_up_naming_them(box, tmp_path):
    from aggbox import auth

    key, other = auth.new_key().hex(), auth.new_key().hex()
    results = run_ranks(box, tmp_path, 3, "setup", keys=[key, other, ""], agg_key=key,
                        setup_timeout=20)
    for r in results:
        assert r["ok"] is False and r["error"] == "AggBoxError", r
        assert "rank(s) 1, 2 were given a different auth key than rank 0" in r["message"], r
        assert r["elapsed"] < 15, "refused at once, not after a timeout"


def test_an_aggregator_with_another_key_installs_nothing(box, tmp_path):
    from aggbox import auth

    key = auth.new_key().hex()
    installed: list = []
    results = run_ranks(box, tmp_path, 2, "setup", keys=[key, key],
                        agg_key=auth.new_key().hex(), installed=installed, setup_timeout=20)
    for r in results:
        assert r["ok"] is False and r["error"] == "AggBoxError", r
        assert "the aggregator host was given a different auth key" in r["message"], r
        assert r["elapsed"] < 15, "refused at once, not after a timeout"
    assert len(installed) == 1 and isinstance(installed[0], Exception), installed


def test_ddp_with_the_hook_matches_gloo(box, tmp_path):
    results = run_ranks(box, tmp_path, 2, "ddp", seed=3, steps=5)
    for r in results:
        assert r["ok"], r
        assert r["moved"] > 1e-3, "the model trained"
        assert r["buckets"] >= 1 and r["calls"] >= r["steps"]
        # per step every gradient is off by at most the bound; SGD (lr 0.1) moves a
        # parameter by lr times it, and 5 steps of a 2-layer MLP amplify it little
        assert r["max_diff"] <= 10 * 0.1 * r["steps"] * r["bounds"] + 1e-6, r
    assert results[0]["max_diff"] == results[1]["max_diff"]


def test_the_example_trains_on_two_hosts(tmp_path):
    """examples/ddp_allreduce.py on h1 and h2, ``python -m aggbox.torch aggregator`` on h0,
    each as a user would start them (own testbed: the CLI attaches its own programs)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    with NetnsTestbed(3, mtu=1500) as tb:
        master = f"{tb.hosts[1].ip}:29699"
        agg = tb.hosts[0].popen(
            [sys.executable, "-m", "aggbox.torch", "aggregator", "--master", master,
             "--ifname", tb.hosts[0].ifname, "--pin-tag", f"tx{os.getpid()}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
        try:
            ranks = [tb.hosts[1 + r].popen(
                [sys.executable, str(REPO / "examples" / "ddp_allreduce.py"), master, str(r),
                 tb.hosts[0].ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                cwd=REPO, text=True) for r in range(2)]
            outs = [p.communicate(timeout=240)[0] for p in ranks]
        finally:
            agg.terminate()
            agg_out = agg.communicate(timeout=30)[0]
    for r, (p, out) in enumerate(zip(ranks, outs, strict=True)):
        assert p.returncode == 0, f"rank {r}:\n{out}\naggregator:\n{agg_out}"
        line = [x for x in out.splitlines() if x.startswith(f"rank {r}: loss")]
        assert line and float(line[0].split()[3].rstrip(",")) < 0.5, out
    assert "installed for 2 ranks" in agg_out and agg.returncode == 0, agg_out
