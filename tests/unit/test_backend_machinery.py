"""Docker and Ansible backends without an engine, SSH or root: the build-time program
check, the image's source digest, the deploy bundle, the remote node supervisor, the
inventory's rank order, and the playbooks' syntax."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aggbox import remote
from aggbox.testbed.ansible import make_bundle, read_inventory
from aggbox.testbed.docker import bridge_name, gateway_ip, run_subnet, source_digest

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = ["provision.yml", "deploy.yml", "run.yml", "fetch.yml", "teardown.yml"]
needs_clang = pytest.mark.skipif(
    shutil.which("clang") is None or not Path("/usr/include/bpf/bpf_helpers.h").exists(),
    reason="needs clang and libbpf-dev (make setup installs them)")


@needs_clang
def test_every_bpf_program_passes_the_build_time_check():
    proc = subprocess.run(["bash", "docker/bpf-check/check.sh"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok ") == len(list((REPO / "bpf").glob("*.c")))


@needs_clang
def test_a_broken_program_fails_the_build_time_check_with_clangs_message(tmp_path):
    shutil.copytree(REPO / "bpf", tmp_path / "bpf")
    src = tmp_path / "bpf" / "broadcast.c"
    src.write_text(src.read_text().replace("members.lookup(&key)", "membrs.lookup(&key)", 1))
    proc = subprocess.run(["bash", "docker/bpf-check/check.sh", str(tmp_path / "bpf")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "BROKEN broadcast.c" in proc.stderr and "broadcast.c:" in proc.stderr


def test_the_image_digest_is_the_same_in_python_and_in_the_build_script():
    shell = subprocess.run(["bash", "docker/source-digest.sh"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert source_digest() == shell


def test_docker_names_fit_interface_limits_and_addresses_do_not_collide():
    assert len(bridge_name("abx-t1234", "abcdef")) <= 15
    assert bridge_name("abx", "a").startswith("abx-")
    net = run_subnet("abcdef", 0)
    assert net.prefixlen == 24 and str(net).startswith("10.214.")
    assert run_subnet("abcdef", 1) != net
    assert gateway_ip(net, 4) == str(net.broadcast_address - 5)


def test_the_deploy_bundle_is_reproducible_and_carries_package_and_programs(tmp_path):
    a = make_bundle(tmp_path / "a.tar.gz")
    b = make_bundle(tmp_path / "b.tar.gz")
    assert a.read_bytes() == b.read_bytes()  # deploy.yml then changes nothing
    import tarfile

    with tarfile.open(fileobj=__import__("io").BytesIO(gzip.decompress(a.read_bytes()))) as t:
        names = t.getnames()
    assert "aggbox/node.py" in names and "aggbox/remote.py" in names
    assert "bpf/broadcast.c" in names and not any("__pycache__" in n for n in names)


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_remote_node_runs_detached_and_follow_returns_its_records_and_exit_code(tmp_path):
    script = "import sys; print('{\"event\": \"ready\"}'); print('rec'); " \
             "print('oops', file=sys.stderr); sys.exit(3)"
    assert remote.main(["start", "--dir", str(tmp_path / "n"), "--env", "X=1", "--",
                        sys.executable, "-c", script]) == 0
    _wait_for(tmp_path / "n" / "rc")
    proc = subprocess.run([sys.executable, "-m", "aggbox.remote", "follow", "--dir",
                           str(tmp_path / "n")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 3
    assert proc.stdout.splitlines() == ['{"event": "ready"}', "rec"]
    assert "oops" in proc.stderr


def test_stopping_a_remote_node_signals_it_and_stop_all_finds_the_rest(tmp_path):
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    for name in ("a", "b"):
        remote.main(["start", "--dir", str(tmp_path / "runs" / name), "--", *sleeper])
        _wait_for(tmp_path / "runs" / name / "pid")
    remote.main(["stop", "--dir", str(tmp_path / "runs" / "a")])
    _wait_for(tmp_path / "runs" / "a" / "rc")
    assert (tmp_path / "runs" / "a" / "rc").read_text() == str(128 + 15)
    remote.main(["stop-all", "--root", str(tmp_path / "runs")])
    _wait_for(tmp_path / "runs" / "b" / "rc")


def test_ranks_follow_the_inventory_groups_aggregator_first(tmp_path):
    inv = tmp_path / "inv.ini"
    inv.write_text(textwrap.dedent("""\
        [aggbox]
        w1 ansible_host=10.0.0.11
        agg ansible_host=10.0.0.10
        w2 ansible_host=10.0.0.12
        extra ansible_host=10.0.0.13
        [aggregator]
        agg
        [workers]
        w1
        w2
        [aggbox:vars]
        ansible_user=admin
        aggbox_iface=ens5
    """))
    hosts = read_inventory(inv)
    assert [h.name for h in hosts] == ["agg", "w1", "w2", "extra"]
    assert hosts[0].vars["aggbox_iface"] == "ens5" and hosts[0].needs_sudo
    assert hosts[1].ssh_argv()[-1] == "admin@10.0.0.11"


def test_the_cloud_inventory_example_parses_with_its_groups():
    hosts = read_inventory(REPO / "playbooks" / "inventory" / "cloud.example.ini")
    assert len(hosts) >= 4
    assert "aggregator" in hosts[0].groups


def test_every_playbook_passes_ansibles_syntax_check():
    playbook = Path(sys.executable).parent / "ansible-playbook"
    proc = subprocess.run([str(playbook), "--syntax-check", "-i",
                           "playbooks/inventory/cloud.example.ini",
                           *(f"playbooks/{p}" for p in PLAYBOOKS)],
                          cwd=REPO, capture_output=True, text=True,
                          env={"PATH": f"{playbook.parent}:/usr/bin:/bin",
                               "ANSIBLE_CONFIG": "playbooks/ansible.cfg"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_run_yml_accepts_what_the_controller_passes():
    # The extra variables' names are a contract between run.yml and AnsibleTestbed._launch.
    text = (REPO / "playbooks" / "run.yml").read_text()
    for name in ("aggbox_cell", "aggbox_nodes", "aggbox_files", "aggbox_group_ips"):
        assert name in text
    assert json.loads(json.dumps({"env": ["A=1"]}))  # env travels as K=V strings
