"""Link impairments from bpf/impair.c: loss, burst loss, duplication and reordering really
happen."""

import subprocess

import pytest

from aggbox.testbed import Netem, NetnsTestbed

pytestmark = pytest.mark.kernel

SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(i.to_bytes(4, "little"), (sys.argv[1], 9999))
"""
RECEIVER = """
import socket, sys
from aggbox.sockets import udp_socket
s = udp_socket(9999)
s.settimeout(1.0)
print("ready", flush=True)
got = []
try:
    while True:
        got.append(int.from_bytes(s.recv(64), "little"))
except OSError:
    pass
print(",".join(map(str, got)))
"""


def transfer(tb: NetnsTestbed, n: int) -> list[int]:
    """Send n numbered datagrams from h0 to h1; return what h1 received, in order."""
    import sys

    rx = tb.hosts[1].popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    tb.hosts[0].run([sys.executable, "-c", SENDER, tb.hosts[1].ip, str(n)])
    out, _ = rx.communicate(timeout=30)
    line = out.strip()
    return [int(x) for x in line.split(",")] if line else []


@pytest.fixture(scope="module")
def two_hosts():
    with NetnsTestbed(2) as tb:
        yield tb


def test_without_impairment_every_datagram_arrives_in_order(two_hosts):
    two_hosts.set_netem(None)
    assert transfer(two_hosts, 500) == list(range(500))


def test_duplicate_everything_gives_four_copies_over_two_links(two_hosts):
    two_hosts.set_netem(Netem(duplicate_pct=100))
    got = transfer(two_hosts, 200)
    assert sorted(got) == sorted(list(range(200)) * 4)


def test_loss_drops_about_the_configured_share_on_each_link(two_hosts):
    two_hosts.set_netem(Netem(loss_pct=20, seed=3))
    got = transfer(two_hosts, 2000)
    # Two links at 20% each deliver 64% on average; a seeded generator, wide bounds.
    assert 0.55 * 2000 < len(got) < 0.73 * 2000
    assert len(set(got)) == len(got)


def loss_pattern(n: int, got: list[int]) -> tuple[float, float, float]:
    """(loss rate, P(lost | previous lost), P(lost | previous arrived)) over seqs 0..n-1."""
    arrived = set(got)
    lost = [i not in arrived for i in range(n)]
    after_lost = [b for a, b in zip(lost, lost[1:], strict=False) if a]
    after_kept = [b for a, b in zip(lost, lost[1:], strict=False) if not a]
    return (sum(lost) / n, sum(after_lost) / max(1, len(after_lost)),
            sum(after_kept) / max(1, len(after_kept)))


def test_burst_loss_drops_in_runs_which_uniform_loss_of_the_same_rate_does_not(two_hosts):
    """Gilbert-Elliott 1% enter, 10% leave, 70% loss in the bad state (~6% per link). With
    independent losses P(lost | previous lost) equals P(lost | previous arrived) up to
    noise; the burst model makes the first several times the second. The same statistic
    is measured on uniform loss of about the same rate, so the bound cannot pass for it."""
    n = 4000
    two_hosts.set_netem(Netem(burst_enter_pct=1, burst_leave_pct=10, burst_loss_pct=70,
                              seed=11))
    rate, after_lost, after_kept = loss_pattern(n, transfer(two_hosts, n))
    # Two links, each losing ~6.4% in the long run: ~12% end to end; wide seeded bounds.
    assert 0.03 < rate < 0.30, rate
    assert after_lost > 4 * after_kept, (rate, after_lost, after_kept)
    two_hosts.set_netem(Netem(loss_pct=6.5, seed=11))
    u_rate, u_after_lost, u_after_kept = loss_pattern(n, transfer(two_hosts, n))
    assert 0.05 < u_rate < 0.20, u_rate
    assert u_after_lost < 2 * u_after_kept, (u_rate, u_after_lost, u_after_kept)


def test_burst_loss_needs_a_way_out_of_the_bad_state(two_hosts):
    from aggbox.errors import TestbedError

    with pytest.raises(TestbedError, match="never leaves"):
        two_hosts.set_netem(Netem(burst_enter_pct=1, burst_leave_pct=0, burst_loss_pct=70))


def test_reorder_swaps_packets_but_loses_none_that_have_a_follower(two_hosts):
    two_hosts.set_netem(Netem(reorder_pct=30, seed=5))
    got = transfer(two_hosts, 1000)
    assert got != sorted(got)
    # A held packet is released after the next one; only the very last can be stranded.
    assert set(range(998)) <= set(got)


def test_clearing_removes_the_filters(two_hosts):
    two_hosts.set_netem(Netem(loss_pct=10))
    two_hosts.set_netem(None)
    out = subprocess.run(["tc", "-n", two_hosts.switch_ns, "filter", "show", "dev", "h0",
                          "ingress"], capture_output=True, text=True).stdout
    assert "impair" not in out
