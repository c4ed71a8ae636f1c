"""Local stand-ins for cloud VMs: netns hosts that run sshd, and an Ansible inventory for them.

The ansible testbed is for real machines; this lets the SAME playbooks, over the SAME
connection type (SSH), run on one Linux machine (tests, CI, trying the cloud path first):

    root namespace: abx-<id>-m  ── veth ──  switch namespace: br0 ── h0, h1, ...
                    10.215.X.200/24                          hosts 10.215.X.1, .2, ...

Each host namespace runs its own ``sshd`` (entered with ``nsenter --net``, so /sys/fs/bpf
pins stay visible) listening on the host's address; the controller reaches it through the
management veth, whose root-namespace end is the only thing created outside the testbed's
namespaces (and goes with them). Keys, host keys, sshd configs and the inventory live in
one folder, which also holds each host's ``aggbox_root`` (the hosts share this machine's
filesystem, so each gets a folder of its own instead of /opt/aggbox).

    python -m aggbox.testbed.sshhosts up --hosts 4 --dir /tmp/abx-ssh   # prints the inventory
    python -m aggbox.testbed.sshhosts down --dir /tmp/abx-ssh
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from aggbox.errors import TestbedError
from aggbox.testbed.netns import (
    BRIDGE,
    NetnsTestbed,
    _batch,
    _run,
    down_run,
    run_in_netns,
)

MGMT_HOST_OCTET = 200  # the controller's address on the testbed subnet: .200
SSH_PORT = 22
STATE = "standins.json"


def _subnet_for(run_id: str) -> str:
    third = int(hashlib.sha1(run_id.encode()).hexdigest()[:4], 16) % 256
    return f"10.215.{third}.0/24"


class SshStandIns:
    """N netns hosts with sshd, reachable from this namespace; ``inventory`` is their
    Ansible inventory. A context manager; ``down()`` removes everything."""

    def __init__(self, n_hosts: int, folder: Path, run_id: str | None = None):
        if not 1 <= n_hosts <= 100:
            raise TestbedError(f"stand-in hosts: 1..100, got {n_hosts}")
        self.folder = Path(folder).resolve()
        tb_id = run_id or os.urandom(3).hex()
        self.testbed = NetnsTestbed(n_hosts, run_id=tb_id, subnet=_subnet_for(tb_id),
                                    persistent=True)
        self.mgmt_if = f"{self.testbed.prefix}-{tb_id}-m"[:15]
        net = self.testbed.net
        self.mgmt_ip = str(net.network_address + MGMT_HOST_OCTET)
        if n_hosts + 1 >= MGMT_HOST_OCTET:
            raise TestbedError("too many stand-in hosts for one /24 with a management address")
        self.inventory = self.folder / "inventory.ini"
        self.key = self.folder / "id_ed25519"

    # -- life cycle

    def up(self) -> SshStandIns:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            raise TestbedError("no sshd: apt-get install openssh-server (make setup does)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.testbed.up()
        try:
            (self.folder / STATE).write_text(json.dumps({
                "run_id": self.testbed.run_id, "prefix": self.testbed.prefix,
                "hosts": len(self.testbed.hosts)}))
            self._management_link()
            self._keys()
            for host in self.testbed.hosts:
                self._start_sshd(sshd, host)
            self._write_inventory()
            self._wait_for_ssh()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Delete the namespaces (which ends sshd and every process in them, and removes
        the management veth), then the folder."""
        self.testbed.down()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> SshStandIns:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- pieces

    def _management_link(self) -> None:
        plen = self.testbed.net.prefixlen
        # Created inside the switch namespace with its peer moved to the root namespace:
        # the switch-side end joins the bridge, the other end gets the controller's address.
        run_in_netns(self.testbed.switch_ns, _batch, "ip", [
            f"link add mgmt type veth peer name {self.mgmt_if} netns {os.getpid()}",
            f"link set mgmt master {BRIDGE} up",
        ])
        _batch("ip", [f"addr add {self.mgmt_ip}/{plen} dev {self.mgmt_if}",
                      f"link set {self.mgmt_if} up"])

    def _keys(self) -> None:
        for key in (self.key, self.folder / "ssh_host_ed25519_key"):
            if not key.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "aggbox-standin",
                      "-f", str(key)])
        (self.folder / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir

    def _start_sshd(self, sshd: str, host) -> None:
        config = self.folder / f"sshd-{host.name}.conf"
        config.write_text("\n".join([
            f"ListenAddress {host.ip}:{SSH_PORT}",
            f"HostKey {self.folder / 'ssh_host_ed25519_key'}",
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
            f"PidFile {self.folder / f'sshd-{host.name}.pid'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # keys under /tmp: see docs/kernel.md, "Containers and SSH hosts"
            "AcceptEnv LANG LC_*",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
            "",
        ]))
        proc = subprocess.run(host.command([sshd, "-f", str(config), "-E",
                                            str(self.folder / f"sshd-{host.name}.log")]),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise TestbedError(f"sshd on {host.name} did not start: {proc.stderr.strip()}")

    def _write_inventory(self) -> None:
        lines = ["# Generated by aggbox.testbed.sshhosts: local stand-ins for cloud VMs.",
                 "[aggbox]"]
        for h in self.testbed.hosts:
            root = self.folder / "hosts" / h.name
            # Stand-ins share this machine's /etc: each persists its sysctls in its folder.
            lines.append(f"{h.name} ansible_host={h.ip} aggbox_root={root} "
                         f"aggbox_sysctl_file={self.folder / (h.name + '-sysctl.conf')}")
        first, rest = self.testbed.hosts[0], self.testbed.hosts[1:]
        lines += ["", "[aggregator]", first.name, "", "[workers]", *(h.name for h in rest), "",
                  "[aggbox:vars]",
                  "ansible_user=root",
                  f"ansible_ssh_private_key_file={self.key}",
                  "ansible_ssh_common_args='-o StrictHostKeyChecking=no "
                  "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR'",
                  "ansible_python_interpreter=/usr/bin/python3",
                  "aggbox_iface=eth0",
                  # Stand-ins share this machine: its apt and headers are already set up by
                  # `make setup`; provisioning still checks them like on a VM.
                  ""]
        self.inventory.write_text("\n".join(lines))

    def _wait_for_ssh(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        for h in self.testbed.hosts:
            while True:
                try:
                    with socket.create_connection((h.ip, SSH_PORT), timeout=1):
                        break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise TestbedError(
                            f"sshd on {h.name} ({h.ip}) unreachable: {exc}") from None
                    time.sleep(0.05)


def down_folder(folder: Path) -> None:
    """Remove the stand-ins recorded in ``folder`` (also after a crash)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        state = None
    if state:
        down_run(state["run_id"], state["prefix"])
    shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggbox.testbed.sshhosts",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start N stand-in hosts; prints the inventory's path")
    up.add_argument("--hosts", type=int, default=4)
    up.add_argument("--dir", type=Path, required=True)
    down = sub.add_parser("down", help="remove the stand-ins of a folder")
    down.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.action == "up":
        standins = SshStandIns(args.hosts, args.dir).up()
        print(standins.inventory)
        return 0
    down_folder(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
