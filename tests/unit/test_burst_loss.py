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
