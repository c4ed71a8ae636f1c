"""The netns testbed on the real kernel: links carry traffic, and nothing outlives a run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aggbox import errors
from aggbox.testbed import GROUP_MAC, Netem, NetnsTestbed, down_all, down_run, load_testbed
from aggbox.testbed import cli as testbed_cli
from aggbox.testbed.netns import list_namespaces, run_in_netns

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def four_hosts():
    with NetnsTestbed(4) as tb:
        yield tb


def run_namespaces(run_id: str) -> list[str]:
    """Namespaces of ``run_id`` present now (this session's prefix)."""
    return [ns for ns in list_namespaces(os.environ["AGGBOX_PREFIX"]) if f"-{run_id}-" in ns]


def udp_socket(ip: str) -> socket.socket:
    """Made inside a host's namespace via ``host.call``; usable from any thread after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 47000))
    sock.settimeout(10)  # generous: a loaded 2-CPU machine (load 20 seen) delays, never loses
    return sock


def assert_every_pair_exchanges_udp(tb: NetnsTestbed) -> None:
    socks = [h.call(udp_socket, h.ip) for h in tb.hosts]
    try:
        for src, s in zip(tb.hosts, socks, strict=True):
            for dst, d in zip(tb.hosts, socks, strict=True):
                if src is not dst:
                    s.sendto(f"{src.name}>{dst.name}".encode(), (dst.ip, 47000))
                    data, (addr, _) = d.recvfrom(100)
                    assert (data.decode(), addr) == (f"{src.name}>{dst.name}", src.ip)
    finally:
        for s in socks:
            s.close()


def test_every_host_reaches_every_other_host_over_udp(four_hosts):
    assert_every_pair_exchanges_udp(four_hosts)


def test_host_run_executes_inside_the_host(four_hosts):
    h1 = four_hosts.hosts[1]
    out = h1.run(["ip", "-j", "addr", "show", "dev", "eth0"]).stdout
    (link,) = json.loads(out)
    assert link["address"] == h1.mac
    assert [a["local"] for a in link["addr_info"]] == [h1.ip]


def test_host_call_returns_results_and_reraises_errors(four_hosts):
    h0 = four_hosts.hosts[0]
    assert h0.call(socket.if_nameindex)[-1][1] == "eth0"
    with pytest.raises(ZeroDivisionError):
        h0.call(lambda: 1 / 0)


def test_every_host_has_permanent_neighbours_for_hosts_and_group_addresses(four_hosts):
    for host in four_hosts.hosts:
        entries = json.loads(host.run(["ip", "-j", "neigh", "show", "dev", "eth0"]).stdout)
        table = {e["dst"]: (e["lladdr"], e["state"]) for e in entries}
        expected = {o.ip: (o.mac, ["PERMANENT"]) for o in four_hosts.hosts if o is not host}
        expected |= {g: (GROUP_MAC, ["PERMANENT"]) for g in four_hosts.group_ips}
        assert table == expected


def test_hosts_accept_local_and_skip_reverse_path_filtering(four_hosts):
    def sysctl(name: str) -> str:
        return Path("/proc/sys/net/ipv4/conf", *name.split(".")).read_text().strip()

    host = four_hosts.hosts[0]
    names = ["all.rp_filter", "eth0.rp_filter", "all.accept_local", "eth0.accept_local"]
    assert [host.call(sysctl, n) for n in names] == ["0", "0", "1", "1"]


def test_the_bridge_bypasses_netfilter(four_hosts):
    path = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if run_in_netns(four_hosts.switch_ns, path.exists):
        assert run_in_netns(four_hosts.switch_ns, path.read_text).strip() == "0"


def test_down_removes_every_namespace_and_the_state_file_and_can_repeat():
    tb = NetnsTestbed(3).up()
    assert sorted(run_namespaces(tb.run_id)) == sorted(tb.namespaces)
    assert tb.state_file.exists()
    tb.down()
    tb.down()
    assert run_namespaces(tb.run_id) == []
    assert not tb.state_file.exists()


def test_down_ends_processes_left_running_in_a_host():
    tb = NetnsTestbed(2).up()
    proc = tb.hosts[0].popen(["sleep", "60"])
    time.sleep(0.1)  # let nsenter exec into sleep inside the namespace
    tb.down()
    assert proc.wait(timeout=5) != 0


def test_two_testbeds_coexist_on_the_same_subnet():
    with NetnsTestbed(2) as a, NetnsTestbed(3) as b:
        assert a.run_id != b.run_id
        assert_every_pair_exchanges_udp(a)
        assert_every_pair_exchanges_udp(b)
        a.down()
        assert run_namespaces(a.run_id) == []
        assert_every_pair_exchanges_udp(b)


def test_a_run_id_in_use_is_refused_and_left_intact(four_hosts):
    with pytest.raises(errors.TestbedError, match="in use"):
        NetnsTestbed(2, run_id=four_hosts.run_id).up()
    assert sorted(run_namespaces(four_hosts.run_id)) == sorted(four_hosts.namespaces)


def test_load_testbed_finds_a_live_testbed(four_hosts):
    loaded = load_testbed(four_hosts.run_id)
    assert [(h.netns, h.ip, h.mac) for h in loaded.hosts] == [
        (h.netns, h.ip, h.mac) for h in four_hosts.hosts]
    assert loaded.describe() == four_hosts.describe()


def test_load_testbed_of_an_unknown_run_says_how_to_list_them():
    with pytest.raises(errors.TestbedError, match="testbed status"):
        load_testbed("nosuchrun")


def test_tx_offload_off_shows_in_ethtool_on_both_ends():
    with NetnsTestbed(2, tx_offload=False) as tb:
        host_side = tb.hosts[1].run(["ethtool", "-k", "eth0"]).stdout
        switch_side = subprocess.run(
            ["nsenter", f"--net=/run/netns/{tb.switch_ns}", "--", "ethtool", "-k", "h1"],
            capture_output=True, text=True, check=True).stdout
        assert "tx-checksumming: off" in host_side
        assert "tx-checksumming: off" in switch_side
        assert_every_pair_exchanges_udp(tb)


def test_tx_offload_stays_on_by_default(four_hosts):
    assert "tx-checksumming: on" in four_hosts.hosts[0].run(["ethtool", "-k", "eth0"]).stdout


def qdiscs(tb: NetnsTestbed) -> list[str]:
    host = tb.hosts[0].run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    switch = subprocess.run(["tc", "-n", tb.switch_ns, "qdisc", "show", "dev", "h0"],
                            capture_output=True, text=True, check=True).stdout
    return [host, switch]


def test_netem_is_on_both_ends_of_every_link_when_configured(four_hosts):
    if not four_hosts.netem_support()[0]:
        pytest.skip("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)")
    four_hosts.set_netem(Netem(delay_ms=1, loss_pct=0.5))
    assert all("netem" in q and "delay 1ms" in q for q in qdiscs(four_hosts))
    assert load_testbed(four_hosts.run_id).describe()["netem"]["delay_ms"] == 1
    four_hosts.set_netem(None)
    assert not any("netem" in q for q in qdiscs(four_hosts))


def test_netem_on_a_kernel_without_it_fails_cleanly():
    with NetnsTestbed(1) as probe:
        if probe.netem_support()[0]:
            pytest.skip("this kernel has netem")
    tb = NetnsTestbed(2, netem=Netem(delay_ms=1))
    with pytest.raises(errors.TestbedError, match="no netem qdisc"):
        tb.up()
    assert run_namespaces(tb.run_id) == []


CHILD = """
import signal, sys, time
from aggbox.testbed import NetnsTestbed
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
tb = NetnsTestbed(3)
if sys.argv[1] == "with":
    with tb:
        print(tb.run_id, flush=True)
        time.sleep(60)
else:  # no context manager: the SIGTERM handler and the atexit hook must do it
    tb.up()
    print(tb.run_id, flush=True)
    time.sleep(60)
"""


def start_child(style: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), style], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.communicate(timeout=10)[1]
    assert len(run_namespaces(run_id)) == 4
    return proc, run_id


@pytest.mark.parametrize("style", ["with", "plain"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_process_leaves_no_namespace_behind(sig, style):
    proc, run_id = start_child(style)
    proc.send_signal(sig)
    proc.communicate(timeout=15)
    assert proc.returncode != 0
    assert run_namespaces(run_id) == []


def test_down_run_removes_a_crashed_run():
    proc, run_id = start_child("with")
    proc.kill()
    proc.communicate(timeout=10)
    left = run_namespaces(run_id)
    assert len(left) == 4  # SIGKILL: no chance to clean up
    assert sorted(down_run(run_id)) == sorted(left)
    assert run_namespaces(run_id) == []
    assert not (Path(os.environ["AGGBOX_STATE_DIR"]) / f"{run_id}.json").exists()


def test_down_all_removes_leftovers_of_crashed_runs(session_prefix):
    for _ in range(2):
        proc, _run_id = start_child("plain")
        proc.kill()
        proc.communicate(timeout=10)
    assert len(down_all(session_prefix)) == 8
    assert list_namespaces(session_prefix) == []
    assert not list(Path(os.environ["AGGBOX_STATE_DIR"]).glob("*.json"))


def test_cli_up_leaves_the_testbed_up_until_cli_down(capsys):
    parser = argparse.ArgumentParser()
    testbed_cli.register(parser.add_subparsers())

    def aggbox(*argv: str) -> str:
        args = parser.parse_args(["testbed", *argv])
        assert args.func(args) == 0
        return capsys.readouterr().out

    out = aggbox("up", "--hosts", "2", "--id", "cli1")
    try:
        assert "10.213.0.2" in out and "aggbox testbed down --id cli1" in out
        assert len(run_namespaces("cli1")) == 3
        assert "cli1" in aggbox("status")
        assert "10.213.0.1" in aggbox("status", "--id", "cli1")
    finally:
        assert "removed 3 namespaces" in aggbox("down", "--id", "cli1")
    assert run_namespaces("cli1") == []
