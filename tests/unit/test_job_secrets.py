"""Job ids and tokens come from `secrets`, per job, whatever the run's seed (issue 11)."""

from __future__ import annotations

from types import SimpleNamespace

from aggbox.collectives.group import new_job_id, new_token
from aggbox.workloads import broadcast


def _testbed(n: int = 3) -> SimpleNamespace:
    hosts = [SimpleNamespace(index=i, ip=f"10.0.0.{i + 1}", mac=f"02:00:00:00:00:{i + 1:02x}",
                             ifname="eth0") for i in range(n)]
    return SimpleNamespace(hosts=hosts, group_ips=["10.0.255.1"], run_id="t")


def test_broadcast_spec_draws_a_new_job_id_and_token_for_the_same_seed():
    specs = [broadcast.build_spec(_testbed(), {"size": 64}, ["aggbox"], iters=2, warmup=0,
                                  seed=1) for _ in range(4)]
    ids = {s["group"]["job_id"] for s in specs}
    tokens = {s["group"]["token"] for s in specs}
    assert len(ids) == 4 and len(tokens) == 4  # 1 in ~2**29 that this flakes


def test_new_ids_and_tokens_are_in_range_and_never_zero():
    assert all(0 < new_job_id() < 2**31 and 0 < new_job_id(30) < 2**30 for _ in range(200))
    assert all(0 < new_token() < 2**32 for _ in range(200))
    assert len({new_token() for _ in range(50)}) == 50
