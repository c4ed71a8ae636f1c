"""Burst-loss (Gilbert-Elliott) parameters: parsing, Netem, refusals (no root)."""

import pytest

from aggbox.errors import TestbedError
from aggbox.testbed import Netem
from aggbox.testbed.impair import BURST_DEFAULT, burst_text, parse_burst_loss
from aggbox.testbed.netns import check_impairment


def test_parse_round_trips():
    assert parse_burst_loss("1,10,70") == (1.0, 10.0, 70.0)
    assert parse_burst_loss(burst_text((0.5, 20.0, 100.0))) == (0.5, 20.0, 100.0)
    assert parse_burst_loss("default") == BURST_DEFAULT
    assert parse_burst_loss("") == parse_burst_loss("0") == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("text", ["1,10", "a,b,c", "1,10,170", "-1,10,70", "1,0,70"])
def test_parse_refuses_bad_values(text):
    with pytest.raises(TestbedError):
        parse_burst_loss(text)


def test_netem_burst_is_off_unless_enter_and_loss_are_set():
    assert Netem().is_noop() and Netem().burst == (0.0, 0.0, 0.0)
    assert Netem(burst_enter_pct=1, burst_leave_pct=10).is_noop()
    netem = Netem(burst_enter_pct=1, burst_leave_pct=10, burst_loss_pct=70)
    assert not netem.is_noop() and netem.burst == (1, 10, 70)


def test_a_bad_state_without_exit_is_refused():
    with pytest.raises(TestbedError, match="never leaves"):
        check_impairment(Netem(burst_enter_pct=1, burst_loss_pct=70))
    with pytest.raises(TestbedError, match="burst_loss_pct"):
        check_impairment(Netem(burst_enter_pct=1, burst_leave_pct=10, burst_loss_pct=101))


def test_the_unimpaired_tcp_ports_are_the_workloads_control_channels():
    from aggbox.testbed.impair import EXEMPT_TCP_PORTS
    from aggbox.workloads import allreduce, broadcast, mapreduce

    assert set(EXEMPT_TCP_PORTS) == {broadcast.CONTROL_PORT, allreduce.CONTROL_PORT,
                                     mapreduce.CONTROL_PORT}
    assert len(EXEMPT_TCP_PORTS) <= 4  # bpf/impair.c's exempt_tcp[4]


def test_impair_counters_are_summed_over_cpus_from_bpftools_json():
    """bpftool prints a per-CPU array's keys and values as numbers (with BTF) or as
    little-endian hex bytes (without); both sum to the same counters, zeros left out."""
    from aggbox.testbed.impair import IMPAIR_COUNTERS, _sum_percpu

    with_btf = [{"key": 0, "values": [{"cpu": 0, "value": 3}, {"cpu": 1, "value": 4}]},
                {"key": 4, "values": [{"cpu": 0, "value": 0}, {"cpu": 1, "value": 9}]},
                {"key": 1, "values": [{"cpu": 0, "value": 0}, {"cpu": 1, "value": 0}]}]
    raw = [{"key": ["0x00", "0x00", "0x00", "0x00"],
            "values": [{"cpu": 0, "value": ["0x03"] + ["0x00"] * 7},
                       {"cpu": 1, "value": ["0x04"] + ["0x00"] * 7}]},
           {"key": ["0x04", "0x00", "0x00", "0x00"],
            "values": [{"cpu": 1, "value": ["0x09"] + ["0x00"] * 7}]}]
    want = {"lost": 7, "burst_lost": 9}
    assert _sum_percpu(with_btf) == _sum_percpu(raw) == want
    assert IMPAIR_COUNTERS[4] == "burst_lost" and len(IMPAIR_COUNTERS) == 7


def test_impair_counter_names_follow_the_c_enum():
    import re
    from pathlib import Path

    from aggbox.testbed.impair import IMPAIR_COUNTERS

    text = (Path(__file__).resolve().parents[2] / "bpf" / "impair.c").read_text()
    body = re.search(r"enum impair_counter \{(.*?)\};", text, re.S).group(1)
    names = [n.strip().removeprefix("IMP_").lower() for n in body.replace("= 0", "").split(",")]
    assert tuple(n for n in names if n and n != "max") == IMPAIR_COUNTERS
