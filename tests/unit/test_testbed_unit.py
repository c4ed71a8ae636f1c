"""The netns testbed's names, addresses and netem arguments (no root needed)."""

from __future__ import annotations

import argparse
import ipaddress

import pytest

from aggbox import errors
from aggbox.collectives.group import Group
from aggbox.testbed import GROUP_MAC, Netem, NetnsTestbed, netns
from aggbox.testbed import cli as testbed_cli

NET = ipaddress.IPv4Network("10.213.0.0/16")
IFNAMSIZ = 15  # usable characters of a Linux interface name


def test_hosts_count_up_from_the_bottom_of_the_subnet():
    assert [netns.host_ip(NET, i) for i in range(3)] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
    assert netns.host_ip(NET, 255) == "10.213.1.0"


def test_group_addresses_count_down_from_the_top_of_the_subnet():
    assert netns.group_addresses(NET, 3) == ["10.213.255.254", "10.213.255.253", "10.213.255.252"]


def test_a_subnet_too_small_for_hosts_and_groups_is_refused():
    netns.check_capacity(ipaddress.IPv4Network("10.0.0.0/29"), 2, 4)  # 6 usable: fits
    with pytest.raises(errors.TestbedError, match="larger subnet"):
        netns.check_capacity(ipaddress.IPv4Network("10.0.0.0/29"), 3, 4)


@pytest.mark.parametrize("bad", ["10.213.0.1/16", "10.213.0.0/33", "fd00::/64", "nonsense"])
def test_a_malformed_subnet_is_refused(bad):
    with pytest.raises(errors.TestbedError, match="invalid subnet"):
        netns.parse_subnet(bad)


def test_host_macs_are_locally_administered_unicast_and_distinct():
    macs = [netns.host_mac("3f9c1e", i) for i in range(netns.MAX_HOSTS)]
    assert len(set(macs)) == len(macs)
    for mac in macs[:3] + macs[-3:]:
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01
    assert GROUP_MAC not in macs
    assert netns.host_mac("3f9c1e", 258).endswith(":01:02")


def test_host_macs_depend_on_the_run_id_and_nothing_else():
    assert netns.host_mac("aaaaaa", 1) == netns.host_mac("aaaaaa", 1)
    assert netns.host_mac("aaaaaa", 1) != netns.host_mac("bbbbbb", 1)


def test_switch_ports_get_their_own_macs():
    assert netns.switch_port_mac("3f9c1e", 7) != netns.host_mac("3f9c1e", 7)
    assert netns.switch_port_mac("3f9c1e", 7).startswith("02:ac:")


def test_group_mac_matches_what_collectives_send_to():
    assert GROUP_MAC == Group.__dataclass_fields__["group_mac"].default


@pytest.mark.parametrize("name", ["abx", "a", "3f9c1e", "abx-t1a2b", "A-b-9"])
def test_valid_names_are_accepted(name):
    assert netns.validate_name("run id", name, 16) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "a b", "a/b", "a.b", "ä", "x" * 17, "a\n"])
def test_unsafe_or_long_names_are_refused(name):
    with pytest.raises(errors.TestbedError, match="letters, digits or dashes"):
        netns.validate_name("run id", name, 16)


def test_default_run_id_is_six_hex_digits():
    run_id = netns.new_run_id()
    assert len(run_id) == 6 and int(run_id, 16) >= 0


def test_prefix_comes_from_the_environment_or_defaults_to_abx(monkeypatch):
    monkeypatch.delenv("AGGBOX_PREFIX", raising=False)
    assert NetnsTestbed(1).prefix == "abx"
    monkeypatch.setenv("AGGBOX_PREFIX", "abx-t42")
    assert NetnsTestbed(1).prefix == "abx-t42"


def test_state_file_lives_in_the_configured_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("AGGBOX_STATE_DIR", str(tmp_path))
    assert NetnsTestbed(2, run_id="r1").state_file == tmp_path / "r1.json"


def test_testbed_names_namespaces_and_hosts_from_prefix_and_run_id():
    tb = NetnsTestbed(3, run_id="r1", prefix="abx")
    assert tb.namespaces == ["abx-r1-sw", "abx-r1-h0", "abx-r1-h1", "abx-r1-h2"]
    h2 = tb.hosts[2]
    assert (h2.name, h2.index, h2.ip, h2.ifname, h2.netns) == ("h2", 2, "10.213.0.3", "eth0",
                                                               "abx-r1-h2")
    assert tb.group_ips == netns.group_addresses(NET, 4)


def test_interface_names_fit_ifnamsiz_for_the_largest_testbed():
    tb = NetnsTestbed(netns.MAX_HOSTS, run_id="r1", prefix="abx")
    assert len(f"h{tb.hosts[-1].index}") <= IFNAMSIZ
    assert max(len(n) for n in (netns.BRIDGE, netns.HOST_IFNAME)) <= IFNAMSIZ


def test_host_commands_enter_the_namespace_without_remounting_sys():
    host = NetnsTestbed(1, run_id="r1", prefix="abx").hosts[0]
    assert host.command(["ip", "link"]) == ["nsenter", "--net=/run/netns/abx-r1-h0", "--",
                                            "ip", "link"]


@pytest.mark.parametrize("kwargs, match", [
    ({"n_hosts": 0}, "n_hosts"),
    ({"n_hosts": 2, "mtu": 20}, "mtu"),
    ({"n_hosts": 2, "run_id": "bad id"}, "run id"),
    ({"n_hosts": 2, "prefix": "abx_"}, "prefix"),
    ({"n_hosts": 2, "netem": Netem(loss_pct=150)}, "loss_pct must be a percentage"),
    ({"n_hosts": 2, "netem": Netem(delay_ms=-1)}, "must not be negative"),
])
def test_bad_parameters_are_refused_before_anything_is_created(kwargs, match):
    with pytest.raises(errors.TestbedError, match=match):
        NetnsTestbed(**kwargs)


def test_describe_reports_what_results_need():
    tb = NetnsTestbed(2, run_id="r1", tx_offload=False, mtu=3000, netem=Netem(delay_ms=1))
    d = tb.describe()
    assert {k: d[k] for k in ("backend", "hosts", "run_id", "subnet", "mtu", "tx_offload")} == {
        "backend": "netns", "hosts": 2, "run_id": "r1", "subnet": "10.213.0.0/16",
        "mtu": 3000, "tx_offload": False}
    assert d["netem"]["delay_ms"] == 1
    assert NetnsTestbed(2, netem=Netem()).describe()["netem"] is None


def test_up_without_root_says_to_run_as_root(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(errors.TestbedError, match="as root"):
        NetnsTestbed(2).up()


def test_netem_arguments_render_every_impairment():
    args = netns.netem_args(Netem(delay_ms=2, jitter_ms=0.5, loss_pct=1.5, duplicate_pct=2,
                                  reorder_pct=25, seed=7))
    assert " ".join(args) == (f"limit {netns.NETEM_LIMIT} delay 2ms 0.5ms loss 1.5% "
                              "duplicate 2% reorder 25% seed 7")


def test_netem_arguments_drop_the_seed_for_old_iproute2():
    assert netns.netem_args(Netem(loss_pct=1), with_seed=False) == [
        "limit", str(netns.NETEM_LIMIT), "loss", "1%"]


def test_netem_jitter_needs_a_delay_to_be_rendered():
    assert "0.5ms" not in netns.netem_args(Netem(jitter_ms=0.5, loss_pct=1))


def test_netem_reorder_without_delay_is_refused():
    with pytest.raises(errors.TestbedError, match="reorder needs a delay"):
        netns.netem_args(Netem(reorder_pct=10))


def test_cli_parses_up_with_impairments():
    parser = argparse.ArgumentParser()
    testbed_cli.register(parser.add_subparsers())
    args = parser.parse_args(["testbed", "up", "--hosts", "4", "--id", "x1", "--loss", "1",
                              "--delay", "2", "--seed", "9", "--no-tx-offload"])
    assert (args.hosts, args.run_id, args.loss, args.delay, args.seed, args.tx_offload) == (
        4, "x1", 1.0, 2.0, 9, False)
    assert args.func is testbed_cli.cmd_up


def test_cli_down_needs_an_id_or_all():
    parser = argparse.ArgumentParser()
    testbed_cli.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["testbed", "down"])
    assert parser.parse_args(["testbed", "down", "--all"]).all
