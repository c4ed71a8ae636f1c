"""The RTT-derived retransmission timer (aggbox/collectives/rtt.py)."""

import pytest

from aggbox.collectives.rtt import RetransmitTimer


def test_before_any_sample_the_initial_timeout_is_used():
    assert RetransmitTimer(initial_s=0.02).rto_s == 0.02


def test_the_timeout_follows_srtt_and_rttvar_within_the_clamps():
    t = RetransmitTimer(min_s=0.0001, max_s=1.0)
    for _ in range(50):
        t.sample(0.002)
    assert t.srtt_s == pytest.approx(0.002)
    assert t.rto_s == pytest.approx(0.002 + 4 * t.rttvar_s)
    assert t.rto_s < 0.0025  # a steady RTT leaves almost no variance
    t.sample(0.02)  # one late sample raises the variance, hence the RTO
    assert t.rto_s > 0.01
    assert RetransmitTimer(min_s=0.001).rto_s >= 0.001
    slow = RetransmitTimer(max_s=0.05)
    slow.sample(1.0)
    assert slow.rto_s == 0.05


def test_back_off_is_linear_first_then_doubles_up_to_the_ceiling_and_resets():
    t = RetransmitTimer(initial_s=0.001, min_s=0.001, max_s=0.01, linear=2)
    seen = []
    for _ in range(7):
        seen.append(t.current_s)
        t.expired()
    assert seen == pytest.approx([0.001, 0.001, 0.001, 0.002, 0.004, 0.008, 0.01])
    t.progress()
    assert t.current_s == pytest.approx(0.001)
