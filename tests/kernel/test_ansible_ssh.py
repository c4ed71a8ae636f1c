"""The cloud path on this machine: the SAME playbooks, over SSH, to local stand-in hosts
(sshd in netns hosts, reached through a management veth), driven by ansible-runner like on
cloud VMs. Provision, deploy, run a broadcast and an allreduce cell, fetch, teardown; the
results have the schema of a netns run, the aggregates are within their bound, the
playbooks are idempotent and nothing is left on the hosts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from backend_helpers import REPO, assert_broadcast_delivered, assert_same_schema, run_experiment

from aggbox.testbed.sshhosts import SshStandIns

pytestmark = [pytest.mark.kernel, pytest.mark.ansible]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    with SshStandIns(4, tmp_path_factory.mktemp("ssh") / "standins") as hosts:
        yield hosts


@pytest.mark.long  # ~2 min; make test-ansible runs it, make test keeps the allreduce cell
def test_a_broadcast_cell_over_ssh_has_the_schema_of_a_netns_run(standins, tmp_path):
    run, seconds = run_experiment("bcast-small", tmp_path / "ansible", "--testbed", "ansible",
                                  "--inventory", str(standins.inventory))
    netns_run, _ = run_experiment("bcast-small", tmp_path / "netns", "--testbed", "netns")
    print(f"\n[timing] ansible broadcast run (provision, deploy, 1 cell, teardown): "
          f"{seconds:.1f} s")
    assert_same_schema(run, netns_run)
    assert_broadcast_delivered(run, {"aggbox", "udp"})
    meta = json.loads((run / "meta.json").read_text())
    assert meta["testbed"]["backend"] == "ansible"
    # fetch.yml brought every node's records, stderr and exit code back.
    fetched = sorted(p.relative_to(run / "hosts").as_posix()
                     for p in (run / "hosts").rglob("rc"))
    assert len(fetched) == 4 and all((run / "hosts" / f).read_text() == "0" for f in fetched)
    # teardown.yml removed the nodes' output and the package from the hosts' folders.
    for h in ("h0", "h1", "h2", "h3"):
        assert not (standins.folder / "hosts" / h / "runs").exists()


def test_provision_deploy_allreduce_fetch_teardown_idempotent_and_exact(standins, tmp_path):
    from aggbox.experiment import load_experiment
    from aggbox.experiment import run_experiment as run_api
    from aggbox.testbed.ansible import AnsibleSession

    lines: list[str] = []
    started = time.monotonic()
    with AnsibleSession(standins.inventory, fetch_dir=tmp_path / "fetched",
                        log=lines.append) as session:
        opened = time.monotonic() - started
        # Idempotent: a second provision and deploy change nothing.
        for playbook in ("provision.yml", "deploy.yml"):
            lines.clear()
            extra = {"aggbox_bundle": str(session.data_dir / "aggbox-bundle.tar.gz")} \
                if playbook == "deploy.yml" else None
            session.playbook(playbook, extra)
            summary = next(line for line in lines if "successful in" in line)
            assert "changed=" not in summary, summary
        run = run_api(load_experiment(REPO / "tests/data/experiments/allreduce-small.yaml"),
                      results_dir=tmp_path / "results", testbed="ansible",
                      testbed_factory=session.factory, progress=False, draw_figures=False)
    total = time.monotonic() - started
    print(f"\n[timing] ansible session open (provision + deploy): {opened:.1f} s; "
          f"allreduce run incl. idempotence checks and teardown: {total:.1f} s")
    samples = pd.read_parquet(run / "samples.parquet")
    assert set(samples["system"]) == {"aggbox", "tcp_ps"}
    assert samples["within_bound"].all()
    assert (samples.loc[samples.system == "aggbox", "max_abs_err"]
            <= samples.loc[samples.system == "aggbox", "err_bound"]).all()
    # Events reached the log as they came; fetch brought the aggregator's and workers' output.
    assert any(line.startswith("ansible run:") for line in lines)
    assert len(list((tmp_path / "fetched").rglob("out.jsonl"))) == 4
    assert not list(Path("/sys/fs/bpf/aggbox").glob(f"{session.tag}*"))


def test_a_failing_host_is_named_in_the_error(standins, tmp_path):
    from aggbox.errors import TestbedError
    from aggbox.testbed.ansible import AnsibleSession

    inventory = tmp_path / "broken.ini"
    text = standins.inventory.read_text().replace(
        "h2 ansible_host=", "h2 aggbox_iface=nosuchif0 ansible_host=")
    inventory.write_text(text)
    with pytest.raises(TestbedError) as err:
        with AnsibleSession(inventory, log=lambda line: None):
            pass
    message = str(err.value)
    assert "provision.yml" in message and "host h2" in message and "artifacts:" in message
    # A failed session keeps its private data dir for the artifacts the message names:
    # they are there, and this test removes them (every run would leave one in /tmp).
    artifacts = Path(message.rsplit("artifacts: ", 1)[1].strip())
    assert artifacts.is_dir() and artifacts.parent.name == "artifacts", artifacts
    shutil.rmtree(artifacts.parent.parent)


# Two filters on the stand-in's ingress hook: what a node killed before it detached leaves
# behind (named like broadcast.c's tc_ingress: aggbox/bpf.py names each filter after its
# entry point), and another tool's program (this kernel has no matchall or gact to make a
# non-BPF one).
TWO_FILTERS = """
from bcc import BPF
from pyroute2 import IPRoute
with IPRoute() as ipr:
    for name, prio in (("tc_ingress", 3), ("other_tool", 9)):
        prog = BPF(text="int %s(struct __sk_buff *skb) { return 0; }" % name).load_func(
            name, BPF.SCHED_CLS)
        ipr.tc("add-filter", "bpf", ipr.link_lookup(ifname="eth0")[0], ":1", fd=prog.fd,
               name=name, parent="ffff:fff2", prio=prio, classid=1, direct_action=True)
"""


def _playbook(standins, name: str, limit: str, *extra: str) -> None:
    """ansible-playbook playbooks/NAME on one stand-in, as a user runs it by hand."""
    res = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(standins.inventory),
         "--limit", limit, str(REPO / "playbooks" / name), *extra],
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "playbooks/ansible.cfg")},
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_provision_reserves_aggboxs_ports_out_of_the_ephemeral_range(standins):
    host = standins.testbed.hosts[3]
    sysctl = "/proc/sys/net/ipv4/ip_local_reserved_ports"
    machine_before = Path(sysctl).read_text()
    _playbook(standins, "provision.yml", host.name)
    inside = subprocess.run(host.command(["cat", sysctl]), capture_output=True, text=True,
                            check=True).stdout.strip()
    assert inside == "47000-49999"
    # Persisted in the stand-in's own file (not this machine's /etc), which it shares.
    persisted = (standins.folder / f"{host.name}-sysctl.conf").read_text()
    assert "net.ipv4.ip_local_reserved_ports=47000-49999" in persisted
    assert Path(sysctl).read_text() == machine_before


def _ingress_filters(host) -> set[tuple[str, int]]:
    out = subprocess.run(host.command(["tc", "-j", "filter", "show", "dev", "eth0", "ingress"]),
                         capture_output=True, text=True, check=True).stdout
    return {(f["options"].get("bpf_name", "?"), f["pref"])
            for f in json.loads(out or "[]") if "options" in f}


def test_teardown_removes_aggboxs_filters_and_leaves_a_foreign_one(standins):
    host = standins.testbed.hosts[1]

    def on_host(*argv: str, check: bool = True) -> None:
        res = subprocess.run(host.command(list(argv)), capture_output=True, text=True)
        assert res.returncode == 0 or not check, res.stderr

    on_host("tc", "qdisc", "add", "dev", "eth0", "clsact", check=False)  # may be there
    try:
        on_host(sys.executable, "-c", TWO_FILTERS)
        assert {("tc_ingress", 3), ("other_tool", 9)} <= _ingress_filters(host)
        # A prefix no run has: the stand-ins share this machine's /sys/fs/bpf.
        _playbook(standins, "teardown.yml", host.name, "-e", "aggbox_pin_prefix=no-such-run-")
        assert _ingress_filters(host) == {("other_tool", 9)}
    finally:
        on_host("tc", "qdisc", "del", "dev", "eth0", "clsact", check=False)


def test_stand_ins_are_gone_after_down(tmp_path):
    hosts = SshStandIns(1, tmp_path / "one").up()
    mgmt = hosts.mgmt_if
    hosts.down()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        if mgmt not in links:
            break
        time.sleep(0.2)
    assert mgmt not in links
    assert not (tmp_path / "one").exists()
    assert os.environ["AGGBOX_PREFIX"]  # the session prefix the leak check knows
