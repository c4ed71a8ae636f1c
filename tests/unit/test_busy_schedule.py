"""The broadcast workload's busy model, schedule and per-system columns (no kernel, no
timing asserted: only the pure functions that decide when things happen)."""

from __future__ import annotations

import math

import pytest

from aggbox.workloads.broadcast import (
    BUSY_UNIT_NS,
    DRAIN_KEY,
    PROMISES,
    Availability,
    block_key,
    cpu_columns,
    join_records,
    make_block_schedule,
    make_gaps,
    member_phase_ns,
    next_wakeup_ns,
    placement_groups,
)

UNIT = BUSY_UNIT_NS


def test_members_get_different_seeded_phases_within_one_unit():
    phases = [member_phase_ns(seed=1, rank=r) for r in range(1, 33)]
    assert all(0 <= p < UNIT for p in phases)
    assert len(set(phases)) == len(phases)  # 32 draws from 1e6 values: no collision
    assert phases == [member_phase_ns(seed=1, rank=r) for r in range(1, 33)]  # seeded
    assert phases != [member_phase_ns(seed=2, rank=r) for r in range(1, 33)]
    # spread over the unit, not bunched at one edge
    assert min(phases) < UNIT / 4 and max(phases) > 3 * UNIT / 4


@pytest.mark.parametrize("phase", [0, 1, 123_456, UNIT - 1])
def test_wakeups_fall_on_phase_plus_whole_units(phase):
    now = 5_000_000_000_017
    for _ in range(50):
        wake = next_wakeup_ns(now, phase)
        assert (wake - phase) % UNIT == 0
        assert now < wake <= now + UNIT  # the NEXT boundary: strictly later, within a unit
        now = wake + (now * 7919) % UNIT // 3  # some time passes after each poll


def test_a_member_exactly_on_its_boundary_sleeps_a_whole_unit():
    phase = 250_000
    on_grid = 42 * UNIT + phase
    assert next_wakeup_ns(on_grid, phase) == on_grid + UNIT


def test_gaps_are_uniform_in_the_range_and_seeded():
    gaps = make_gaps(5000, 2000, 1000, seed=3)
    assert gaps == make_gaps(5000, 2000, 1000, seed=3)
    assert gaps != make_gaps(5000, 2000, 1000, seed=4)
    assert all(2_000_000 <= g <= 3_000_000 for g in gaps)
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 2_500_000) < 20_000  # uniform: mean mid-range (sd of mean ~4 us)


def test_send_times_do_not_phase_lock_with_the_busy_unit():
    """The root's send instants, taken modulo the 1 ms unit, cover the unit evenly: a
    member's wait for its next wake-up is then uniform, never systematically short/long."""
    n, bins = 6000, 10
    gaps = make_gaps(n, 2000, 1000, seed=1)
    send_cost = 37_000  # a constant send duration shifts every instant alike
    t, counts = 0, [0] * bins
    for g in gaps:
        t += send_cost + g
        counts[(t % UNIT) * bins // UNIT] += 1
    expected = n / bins
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 27.9, counts  # chi-square, 9 degrees of freedom, p = 0.001


def test_a_fixed_gap_would_phase_lock_which_is_why_the_gap_is_jittered():
    """The control: without jitter, a period of whole units (a fast send, a 2 ms pause)
    puts every send on the same point of the unit, so the same members always wait long."""
    gaps = make_gaps(1000, 2000, 0, seed=1)
    t, residues = 0, set()
    for g in gaps:
        t += g
        residues.add(t % UNIT)
    assert len(residues) == 1


def test_warmup_and_measured_blocks_never_mix_and_every_system_gets_its_count():
    blocks = make_block_schedule(["aggbox", "tcp", "udp"], warmup=15, iters=25, seed=1)
    first_measured = next(i for i, b in enumerate(blocks) if b[2])
    assert not any(b[2] for b in blocks[:first_measured])
    assert all(b[2] for b in blocks[first_measured:])
    for system in ("aggbox", "tcp", "udp"):
        assert sum(n for s, n, m in blocks if s == system and not m) == 15
        assert sum(n for s, n, m in blocks if s == system and m) == 25
    assert block_key("tcp", True) == "tcp" and block_key("tcp", False) != "tcp"


def test_an_idle_availability_blocks_and_an_unknown_mode_is_refused():
    avail = Availability("idle")
    assert avail.wait(lambda: None, lambda timeout: ("blocked", timeout), 3.0) == ("blocked", 3.0)
    with pytest.raises(Exception, match="receivers"):
        Availability("sleepy")


def test_a_busy_member_takes_what_is_queued_before_going_back_to_sleep():
    queue = ["m1", "m2"]
    polls = []

    def poll():
        polls.append(1)
        return queue.pop(0) if queue else None

    avail = Availability("busy", phase_ns=0, unit_ns=10_000)  # 10 us units: a fast test
    assert avail.wait(poll, lambda t: None, 1.0) == "m1"
    n = len(polls)
    assert avail.wait(poll, lambda t: None, 1.0) == "m2"
    assert len(polls) == n + 1  # polled again at once, without sleeping first
    assert avail.wait(poll, lambda t: None, 0.001) is None  # nothing more: gives up


def test_promises_are_named_for_every_system():
    assert PROMISES["aggbox"] == PROMISES["tcp_kack"] == "kernel"
    assert {PROMISES[s] for s in ("tcp", "udp", "mcast", "gloo")} == {"app"}


def test_overcommit_counts_only_the_processes_a_completion_waits_for():
    # root-alone on 2 CPUs, 15 members on CPU 1
    assert placement_groups("kernel", 15, "0", "1-1", one_machine=True) == [(1, 1)]
    assert placement_groups("app", 15, "0", "1", one_machine=True) == [(1, 1), (15, 1)]
    assert placement_groups("app", 15, "", "", one_machine=False) == [(1, 1)]


def _events(busy_root: int, members_busy: list[int], poll_rate: float = 0.0) -> list[dict]:
    tally = {"busy_ns": busy_root, "wall_ns": 1_000_000_000, "ops": 100, "windows": 10}
    drain = {"busy_ns": 10 * 50_000, "wall_ns": 10 * 3_000_000, "ops": 10, "windows": 10}
    root = {"event": "done", "role": "root",
            "cpu": {"source": "cpuidle", "background_rate": 0.01, "window_overhead_ns": 1000.0,
                    "tallies": {"aggbox": tally, DRAIN_KEY: drain}},
            "proc": {"aggbox": {"busy_ns": 2_000_000, "wall_ns": 10**9, "ops": 100,
                                "windows": 10}}}
    members = [{"event": "done", "role": "member", "rank": i + 1, "poll_rate": poll_rate,
                "proc": {"aggbox": {"busy_ns": b, "wall_ns": 10**8, "ops": 100, "windows": 10}}}
               for i, b in enumerate(members_busy)]
    return [root, *members]


def test_cpu_columns_subtract_background_meter_and_drain_per_window():
    cols = cpu_columns(_events(30_000_000, [1_000_000, 3_000_000]), ["aggbox"], 2, "0", "1",
                       True, "idle")["aggbox"]
    drain_ns = (500_000 - 0.01 * 30_000_000 - 1000 * 10) / 10  # per probe window
    expected = (30_000_000 - 0.01 * 1e9 - (1000 + drain_ns) * 10) / 100 / 1e3
    assert cols["cpu_us_per_op"] == pytest.approx(expected)
    assert cols["root_cpu_us_per_op"] == pytest.approx(20.0)
    assert cols["members_cpu_us_per_op"] == pytest.approx(40.0)  # 4 ms over 100 ops
    assert cols["promise"] == "kernel" and cols["overcommitted"] is False
    assert cols["cpu_source"] == "cpuidle"


def test_busy_members_idle_polling_is_not_billed_and_spin_is_not_measurable():
    busy = cpu_columns(_events(30_000_000, [1_000_000], poll_rate=0.005), ["aggbox"], 1, "0",
                       "1", True, "busy")["aggbox"]
    assert busy["members_cpu_us_per_op"] == pytest.approx((1_000_000 - 500_000) / 100 / 1e3)
    spin = cpu_columns(_events(30_000_000, [1_000_000]), ["aggbox"], 1, "0", "1", True,
                       "spin")["aggbox"]
    assert math.isnan(spin["cpu_us_per_op"]) and math.isnan(spin["members_cpu_us_per_op"])


def test_join_records_drops_warmup_and_needs_every_member_for_delivery():
    records = [
        {"kind": "send", "system": "tcp", "iter": 0, "t_send_ns": 0, "t_done_ns": 5, "cpu_ns": 1},
        {"kind": "send", "system": "tcp", "iter": 1, "t_send_ns": 1000, "t_done_ns": 3000,
         "cpu_ns": 500},
        {"kind": "recv", "system": "tcp", "iter": 1, "rank": 1, "t_recv_ns": 2000, "ok": True},
        {"kind": "recv", "system": "tcp", "iter": 1, "rank": 2, "t_recv_ns": 2500, "ok": True},
        {"kind": "send", "system": "tcp", "iter": 2, "t_send_ns": 9000, "t_done_ns": 9900,
         "cpu_ns": 5},
        {"kind": "recv", "system": "tcp", "iter": 2, "rank": 1, "t_recv_ns": 9500, "ok": True},
    ]
    samples = join_records(records, n_members=2, warmup=1)
    assert [s["iter"] for s in samples] == [0, 1]
    assert samples[0]["completion_us"] == 2.0 and samples[0]["delivery_us"] == 1.5
    assert samples[0]["delivered"] and not samples[1]["delivered"]
    assert samples[1]["delivery_us"] is None


def _sample(system: str, i: int, completion: float, promise: str) -> dict:
    return {"system": system, "iter": i, "completion_us": completion,
            "delivery_us": completion + 10, "sender_cpu_us": 5.0, "delivered": True,
            "cpu_us_per_op": 20.0, "root_cpu_us_per_op": 8.0, "members_cpu_us_per_op": math.nan,
            "promise": promise, "procs_per_cpu": 1.0 if promise == "kernel" else 15.0,
            "overcommitted": promise == "app", "cpu_source": "cpuidle"}


def test_the_bench_summary_gives_cis_p99_only_from_100_samples_and_labelled_ratios():
    from aggbox.bench import broadcast_ratios, summarize_broadcast

    samples = ([_sample("aggbox", i, 100 + i % 7, "kernel") for i in range(120)]
               + [_sample("tcp_kack", i, 200 + i % 5, "kernel") for i in range(120)]
               + [_sample("tcp", i, 1000 + i % 9, "app") for i in range(50)])
    per = summarize_broadcast(samples, ["aggbox", "tcp_kack", "tcp"])
    assert per["aggbox"]["completion_p99_us"] is not None
    assert per["tcp"]["completion_p99_us"] is None and per["tcp"]["n"] == 50
    lo, hi = per["aggbox"]["completion_p50_ci"]
    assert lo <= per["aggbox"]["completion_p50_us"] <= hi
    assert per["aggbox"]["members_cpu_us_per_op"] is None  # NaN becomes null in JSON
    assert per["tcp"]["overcommitted"] and per["tcp"]["promise"] == "app"
    ratios, headline = broadcast_ratios(samples, per, "busy")
    assert ratios["aggbox/tcp completion p50"]["promises"] == "kernel vs app"
    assert set(headline) == {"aggbox/tcp_kack completion p50", "aggbox/tcp completion p50"}
    _, idle_headline = broadcast_ratios(samples, per, "idle")
    assert set(idle_headline) == {"aggbox/tcp_kack completion p50"}
