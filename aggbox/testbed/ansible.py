"""The ansible testbed: hosts are machines from an Ansible inventory, driven by playbooks/.

``aggbox run experiments/X.yaml --testbed ansible --inventory INV`` opens one
:class:`AnsibleSession` for the run:

- at the start, ``provision.yml`` (toolchain, kernel headers, tuning; it reports each
  host's data-plane address and MAC) and ``deploy.yml`` (the package and bpf/);
- per cell, an :class:`AnsibleTestbed` of the first N hosts in group order (aggregator,
  workers, mappers, reducers, then the rest of group ``aggbox``). Workloads start nodes
  through :class:`AnsibleHost` like on any backend; starts that arrive together (every
  member of a broadcast, say) become ONE ``run.yml``, which starts them detached on the
  hosts (:mod:`aggbox.remote`); each node's records then stream back over SSH (the same
  connection settings Ansible uses), so the workload sees a process (:class:`RemoteNode`);
- when a cell ends, ``fetch.yml`` brings the nodes' raw output to the run's ``hosts/``;
- at the end (also on error or Ctrl-C), ``teardown.yml``.

ansible-runner is used the way its issue tracker advises: a fresh private data dir per
session and a unique ident per playbook run (artifacts rotated), events streamed to the
progress display as they come, and a failure that names the host, the task and the
message, with the artifacts' path.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import ipaddress
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggbox import ROOT
from aggbox.errors import SetupError, TestbedError
from aggbox.testbed.base import Host, Netem, Testbed
from aggbox.testbed.netns import group_addresses

PLAYBOOKS_DIR = ROOT / "playbooks"
#: Inventory groups, in the order ranks are given out (the first host is rank 0: the
#: broadcast root / allreduce aggregator); hosts of group ``aggbox`` not in any come last.
ROLE_GROUPS = ("aggregator", "root", "workers", "mappers", "reducers")
BATCH_QUIET_S = 0.3  # node starts this close together go into one run.yml
ROTATE_ARTIFACTS = 50
Log = Callable[[str], None]


def _stderr_log(line: str) -> None:
    # The experiment's progress bar redirects stderr and draws these lines above itself.
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Inventory


@dataclass
class InventoryHost:
    name: str
    vars: dict
    groups: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)  # from provision.yml

    @property
    def root(self) -> str:
        return str(self.vars.get("aggbox_root", "/opt/aggbox"))

    @property
    def python(self) -> str:
        return str(self.vars.get("aggbox_python", "/usr/bin/python3"))

    def ssh_argv(self, control_dir: Path | None = None) -> list[str]:
        """ssh with the connection settings Ansible uses for this host."""
        v = self.vars
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15",
                "-o", "ServerAliveInterval=15"]
        if control_dir is not None:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/cm-%C",
                     "-o", "ControlPersist=120"]
        if v.get("ansible_port"):
            argv += ["-p", str(v["ansible_port"])]
        if v.get("ansible_ssh_private_key_file"):
            argv += ["-i", str(v["ansible_ssh_private_key_file"])]
        for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
            argv += shlex.split(str(v.get(key, "")))
        user = v.get("ansible_user")
        target = str(v.get("ansible_host", self.name))
        return [*argv, f"{user}@{target}" if user else target]

    @property
    def needs_sudo(self) -> bool:
        return str(self.vars.get("ansible_user", "root")) != "root"


def _ansible_on_path() -> None:
    """ansible-runner looks ansible-playbook up on PATH: make it the one next to us (the
    venv's), also when the venv is not activated (.venv/bin/aggbox, make)."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def read_inventory(inventory: Path) -> list[InventoryHost]:
    """Hosts of group ``aggbox`` (with their merged variables), in rank order."""
    import ansible_runner

    _ansible_on_path()
    out, err = ansible_runner.get_inventory(action="list", inventories=[str(inventory)],
                                            response_format="json", quiet=True)
    if not isinstance(out, dict):
        raise TestbedError(f"cannot read inventory {inventory}: {err or out}")
    hostvars = out.get("_meta", {}).get("hostvars", {})

    def members(group: str, seen: set[str] | None = None) -> list[str]:
        seen = seen if seen is not None else set()
        if group in seen:
            return []
        seen.add(group)
        data = out.get(group, {})
        names = list(data.get("hosts", []))
        for child in data.get("children", []):
            names += members(child, seen)
        return names

    everyone = members("aggbox")
    if not everyone:
        raise TestbedError(f"inventory {inventory} has no hosts in group 'aggbox'; see "
                           "playbooks/inventory/cloud.example.ini")
    ordered: list[str] = []
    for group in (*ROLE_GROUPS, "aggbox"):
        for name in members(group):
            if name in everyone and name not in ordered:
                ordered.append(name)
    groups = {g: set(members(g)) for g in out if g not in ("_meta",)}
    return [InventoryHost(n, dict(hostvars.get(n, {})),
                          sorted(g for g, m in groups.items() if n in m)) for n in ordered]


def make_bundle(path: Path, root: Path = ROOT) -> Path:
    """A reproducible tar.gz of the package and bpf/ (same checkout, same bytes: deploy.yml
    then changes nothing)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = [p for top in ("aggbox", "bpf") for p in (root / top).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
        files.append(root / "pyproject.toml")
        for p in sorted(files):
            data = p.read_bytes()
            info = tarfile.TarInfo(p.relative_to(root).as_posix())
            info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o644, 0, 0, 0
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path


# ---------------------------------------------------------------------------------------
# Playbook runs


class PlaybookFailed(TestbedError):
    """A playbook failed; ``hosts`` names the hosts that failed or were unreachable."""

    def __init__(self, message: str, hosts: list[str]):
        super().__init__(message)
        self.hosts = hosts


class AnsibleSession:
    """Provisioned, deployed hosts for one experiment run. A context manager: entering
    provisions and deploys, leaving tears down (teardown.yml) whatever happened."""

    def __init__(self, inventory: str | Path, fetch_dir: Path | None = None,
                 log: Log = _stderr_log, keep_artifacts: bool | None = None):
        self.inventory = Path(inventory).resolve()
        if not self.inventory.exists():
            raise SetupError(f"no inventory {inventory}; see playbooks/inventory/ and "
                             "playbooks/README.md")
        self.fetch_dir = fetch_dir
        self.log = log
        self.keep_artifacts = (os.environ.get("AGGBOX_KEEP_ANSIBLE") == "1"
                               if keep_artifacts is None else keep_artifacts)
        self.tag = "an" + secrets.token_hex(3)  # pins, cells and node folders carry it
        self.hosts: list[InventoryHost] = []
        self.group_ips: list[str] = []
        self.data_dir: Path | None = None
        self.failed = False
        self._runs = 0
        self._cells = 0
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    # -- life cycle

    def __enter__(self) -> AnsibleSession:
        return self.open()

    def __exit__(self, exc_type, *_exc) -> None:
        self.close(failed=exc_type is not None)

    def open(self) -> AnsibleSession:
        try:
            import ansible_runner  # noqa: F401
        except ImportError:
            raise SetupError("ansible-runner is missing: run `make setup`") from None
        _ansible_on_path()
        self.data_dir = Path(tempfile.mkdtemp(prefix="aggbox-ansible-"))
        (self.data_dir / "ssh").mkdir()
        self.hosts = read_inventory(self.inventory)
        try:
            reports = self.playbook("provision.yml", want_task="AggBox host report")
            for host in self.hosts:
                if host.name not in reports:
                    raise TestbedError(f"provision.yml gave no report for host {host.name}")
                host.report = reports[host.name]["aggbox_report"]
            self.group_ips = self._group_ips()
            bundle = make_bundle(self.data_dir / "aggbox-bundle.tar.gz")
            self.playbook("deploy.yml", {"aggbox_bundle": str(bundle)})
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def close(self, failed: bool = False) -> None:
        """teardown.yml on every host, then the private data dir (kept when something
        failed, for its artifacts). Idempotent."""
        if self.data_dir is None:
            return
        self.failed = self.failed or failed
        try:
            if self.hosts:
                self.playbook("teardown.yml", {"aggbox_pin_prefix": self.tag,
                                               "aggbox_group_ips": self.group_ips})
        except TestbedError as exc:
            self.failed = True
            self.log(f"ansible: teardown failed: {exc}")
        finally:
            self._stop_ssh_masters()
            if self.failed or self.keep_artifacts:
                self.log(f"ansible: artifacts kept in {self.data_dir}")
            else:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def _stop_ssh_masters(self) -> None:
        if self.data_dir is None:
            return
        for host in self.hosts:
            with contextlib.suppress(Exception):
                subprocess.run([*host.ssh_argv(self.data_dir / "ssh")[:-1], "-O", "exit",
                                host.ssh_argv()[-1]], capture_output=True, timeout=10)

    def _group_ips(self) -> list[str]:
        """Group addresses from the top of the first host's subnet, unless the inventory
        names them (``aggbox_group_ips``); none may be a host's address."""
        named = self.hosts[0].vars.get("aggbox_group_ips")
        if named:
            return [str(ip) for ip in named]
        first = self.hosts[0].report
        net = ipaddress.IPv4Interface(f"{first['ip']}/{first['prefixlen']}").network
        taken = {h.report["ip"] for h in self.hosts}
        ips = [ip for ip in group_addresses(net, 4 + len(taken)) if ip not in taken][:4]
        return ips

    # -- running playbooks

    def playbook(self, name: str, extravars: dict | None = None, limit: str | None = None,
                 want_task: str | None = None) -> dict[str, Any]:
        """Run playbooks/``name``; return ``{host: result msg}`` of task ``want_task``.
        Raises :class:`PlaybookFailed` naming the failed hosts."""
        import ansible_runner

        assert self.data_dir is not None, "session not open"
        with self._lock:
            self._runs += 1
            ident = f"{Path(name).stem}-{self._runs:03d}-{secrets.token_hex(2)}"
        stem = Path(name).stem
        failures: list[tuple[str, str, str]] = []
        wanted: dict[str, Any] = {}
        started = time.monotonic()

        def on_event(event: dict) -> bool:
            kind, data = event.get("event"), event.get("event_data", {})
            host, task = data.get("host", ""), data.get("task", "")
            if kind == "playbook_on_task_start" and not data.get("is_conditional"):
                self.log(f"ansible {stem}: {task}")
            elif kind == "runner_on_ok" and want_task and task == want_task:
                wanted[host] = data.get("res", {}).get("msg")
            elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get(
                    "ignore_errors"):
                msg = _result_message(data.get("res", {}))
                what = "unreachable" if kind == "runner_on_unreachable" else "FAILED"
                failures.append((host, task, msg))
                self.log(f"ansible {stem}: {host} {what} in {task!r}: {msg}")
            elif kind == "runner_item_on_failed":
                msg = _result_message(data.get("res", {}))
                self.log(f"ansible {stem}: {host} item failed in {task!r}: {msg}")
            return True

        n_hosts = len(self.hosts) or 1
        runner = ansible_runner.run(
            private_data_dir=str(self.data_dir),
            project_dir=str(PLAYBOOKS_DIR),
            playbook=str(PLAYBOOKS_DIR / name),
            inventory=str(self.inventory),
            extravars=extravars or {},
            limit=limit,
            ident=ident,
            rotate_artifacts=ROTATE_ARTIFACTS,
            quiet=True,
            event_handler=on_event,
            envvars={
                "ANSIBLE_CONFIG": str(PLAYBOOKS_DIR / "ansible.cfg"),
                "ANSIBLE_HOST_KEY_CHECKING": "False",
                "ANSIBLE_PIPELINING": "True",
                "ANSIBLE_FORKS": str(max(5, min(n_hosts, 50))),
                "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.data_dir / "ssh"),
                "ANSIBLE_RETRY_FILES_ENABLED": "False",
            },
            settings={"suppress_ansible_output": True, "job_timeout": 3600},
        )
        seconds = time.monotonic() - started
        self.timings[stem] = self.timings.get(stem, 0.0) + seconds
        stats = runner.stats or {}
        summary = ", ".join(f"{k}={sum(stats.get(k, {}).values())}"
                            for k in ("ok", "changed", "failures", "dark") if stats.get(k))
        self.log(f"ansible {stem}: {runner.status} in {seconds:.1f} s ({summary or 'no stats'})")
        if runner.status != "successful" or runner.rc != 0:
            self.failed = True
            hosts = sorted({h for h, _, _ in failures} | set(stats.get("failures", {}))
                           | set(stats.get("dark", {})))
            if failures:
                host, task, msg = failures[0]
                detail = f"host {host} failed in task {task!r}: {msg}"
                if len(hosts) > 1:
                    detail += f" (failed hosts: {', '.join(hosts)})"
            else:
                out = runner.stdout.read() if runner.stdout else ""
                detail = "\n".join(out.strip().splitlines()[-8:]) or f"rc {runner.rc}"
            artifacts = Path(runner.config.artifact_dir)
            raise PlaybookFailed(f"ansible {name} {runner.status}: {detail}\n"
                                 f"artifacts: {artifacts}", hosts)
        return wanted

    # -- testbeds

    def testbed(self, n_hosts: int) -> AnsibleTestbed:
        if n_hosts > len(self.hosts):
            raise TestbedError(f"the cell needs {n_hosts} hosts; inventory {self.inventory} "
                               f"has {len(self.hosts)} in group 'aggbox'")
        with self._lock:
            self._cells += 1
            cell = f"{self.tag}-c{self._cells:03d}"
        return AnsibleTestbed(self, self.hosts[:n_hosts], cell)

    def factory(self, backend: str, params: dict, run_id: str = "") -> AnsibleTestbed:
        """An experiment runner's testbed factory (see aggbox.experiment)."""
        from aggbox.testbed import Netem as _Netem

        netem = _Netem(loss_pct=float(params.get("loss", 0)),
                       duplicate_pct=float(params.get("duplicate", 0)),
                       reorder_pct=float(params.get("reorder", 0)),
                       delay_ms=float(params.get("delay", 0)))
        if backend != "ansible":
            raise TestbedError(f"an ansible session makes ansible testbeds, not {backend!r}")
        _refuse_impairments(netem)
        from aggbox.testbed import testbed_hosts

        return self.testbed(testbed_hosts(params))


def _result_message(res: dict) -> str:
    msg = res.get("msg") or res.get("stderr") or res.get("module_stderr") or ""
    if not msg and res.get("results"):
        msg = "; ".join(_result_message(r) for r in res["results"] if r.get("failed"))
    return " ".join(str(msg).split())[:400]


def _refuse_impairments(netem: Netem) -> None:
    if not netem.is_noop():
        raise TestbedError("link impairments are emulated on the netns testbed only; cloud "
                           "links are what they are (run this cell with --testbed netns)")


# ---------------------------------------------------------------------------------------
# Hosts, nodes and the testbed of one cell


class RemoteNode:
    """A node started by run.yml on a remote host, seen as a :class:`subprocess.Popen`
    (``stdout``, ``poll``, ``wait``, ``terminate``, ``kill``, ``returncode``): its records
    stream back through ``ssh HOST python -m aggbox.remote follow``, which exits with the
    node's exit code. Until run.yml has started it, it is pending (``poll()`` is None)."""

    def __init__(self, host: AnsibleHost, argv: Sequence[str], name: str,
                 env: Mapping[str, str], stdout: Any, stderr: Any, text: bool):
        self.args, self.name, self.env = list(argv), name, dict(env)
        self.host = host
        self.folder = f"{host.testbed.cell_dir(host)}/{name}"
        self.returncode: int | None = None
        self.pid: int | None = None
        self._ssh: subprocess.Popen | None = None
        self._started = threading.Event()
        self._cancelled = False
        self.stdout = None
        if stdout == subprocess.PIPE:
            r, self._out_w = os.pipe()
            self.stdout = os.fdopen(r, "r" if text else "rb",
                                    **({"encoding": "utf-8", "errors": "replace"} if text else {}))
        else:
            self._out_w = os.open(os.devnull, os.O_WRONLY)
        if stderr in (None, subprocess.DEVNULL, subprocess.PIPE):
            self._err_w = os.open(os.devnull, os.O_WRONLY)
        else:
            self._err_w = os.dup(stderr if isinstance(stderr, int) else stderr.fileno())

    def _remote(self, *args: str) -> list[str]:
        h = self.host.inv
        cmd = ["env", f"PYTHONPATH={h.root}/src", h.python, "-m", "aggbox.remote", *args]
        if h.needs_sudo:
            cmd = ["sudo", "-n", *cmd]
        return [*h.ssh_argv(self.host.testbed.session.data_dir / "ssh"), shlex.join(cmd)]

    # called by the testbed's launcher
    def _launched(self) -> None:
        self._ssh = subprocess.Popen(self._remote("follow", "--dir", self.folder),
                                     stdin=subprocess.DEVNULL, stdout=self._out_w,
                                     stderr=self._err_w)
        self._close_ends()
        self.pid = self._ssh.pid
        self._started.set()

    def _failed(self, message: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._err_w, (message.rstrip() + "\n").encode())
        self._close_ends()
        self.returncode = 255
        self._started.set()

    def _close_ends(self) -> None:
        for fd in (self._out_w, self._err_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # the Popen surface
    def poll(self) -> int | None:
        if self.returncode is not None or not self._started.is_set() or self._ssh is None:
            return self.returncode
        code = self._ssh.poll()
        if code is not None:
            self.returncode = code
        return code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._started.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        if self._ssh is not None and self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.returncode = self._ssh.wait(left)
        assert self.returncode is not None
        return self.returncode

    def _signal(self, name: str) -> None:
        if not self._started.is_set():
            self._cancelled = True
            return
        if self.returncode is None and self._ssh is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(self._remote("stop", "--dir", self.folder, "--signal", name),
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=20)

    def terminate(self) -> None:
        self._signal("TERM")

    def kill(self) -> None:
        self._signal("KILL")
        if self._ssh is not None and self._ssh.poll() is None:
            self._ssh.kill()


@dataclass
class AnsibleHost(Host):
    """A machine from the inventory, in one cell's testbed."""

    inv: Any = field(default=None, repr=False, compare=False)  # InventoryHost
    testbed: Any = field(default=None, repr=False, compare=False)  # AnsibleTestbed

    def command(self, argv: Sequence[str]) -> list[str]:
        prefix = ["sudo", "-n"] if self.inv.needs_sudo else []
        return [*self.inv.ssh_argv(), shlex.join([*prefix, *argv])]

    def popen(self, argv: Sequence[str], **kwargs) -> RemoteNode:
        return self.testbed.submit(self, argv, env=kwargs.get("env") or {},
                                   stdout=kwargs.get("stdout"), stderr=kwargs.get("stderr"),
                                   text=bool(kwargs.get("text")))

    def put_file(self, local: Path, name: str) -> str:
        return self.testbed.stage(self, Path(local), name)

    def node_python(self) -> str:
        return self.inv.python

    def node_env(self, env: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in env.items()
                if k == "PYTHONUNBUFFERED" or (k.startswith("AGGBOX_")
                                               and k != "AGGBOX_STATE_DIR")}


class AnsibleTestbed(Testbed):
    """The first N inventory hosts, for one cell. Starting nodes goes through run.yml;
    ``down()`` fetches the cell's output (fetch.yml)."""

    backend = "ansible"

    def __init__(self, session: AnsibleSession, hosts: list[InventoryHost], cell: str):
        self.session, self.run_id = session, cell
        self.hosts: list[AnsibleHost] = [
            AnsibleHost(name=h.name, index=i, ip=h.report["ip"], mac=h.report["mac"],
                        ifname=h.report["ifname"], inv=h, testbed=self)
            for i, h in enumerate(hosts)]
        self.group_ips = list(session.group_ips)
        # The hosts' real MTU (workloads size packets from it); cells cannot change it:
        # provision.yml sets it for the session (aggbox_mtu).
        self.mtu = min((int(h.report.get("mtu", 1500)) for h in hosts), default=1500)
        self._pending: list[RemoteNode] = []
        self._files: list[dict] = []
        self._copied: set[tuple[str, str]] = set()
        self._nodes: list[RemoteNode] = []
        self._cond = threading.Condition()
        self._last_submit = 0.0
        self._launcher: threading.Thread | None = None
        self._names: dict[str, int] = {}
        self.is_up = False

    def cell_dir(self, host: AnsibleHost) -> str:
        return f"{host.inv.root}/runs/{self.run_id}"

    def up(self) -> AnsibleTestbed:
        self.is_up = True
        return self

    def down(self) -> None:
        """Stop what still runs, then fetch the cell's output into the run's hosts/."""
        if not self.is_up:
            return
        self.is_up = False
        with self._cond:
            self._cond.notify_all()
        for node in self._nodes:
            if node.poll() is None:
                node.terminate()
        session = self.session
        if session.fetch_dir is not None and self._nodes and session.data_dir is not None:
            names = sorted({n.host.name for n in self._nodes})
            session.playbook("fetch.yml", {"aggbox_fetch_dir": str(session.fetch_dir),
                                           "aggbox_cell": self.run_id},
                             limit=",".join(names))

    def describe(self) -> dict:
        first = self.hosts[0].inv.report if self.hosts else {}
        return {
            **super().describe(),
            "inventory": str(self.session.inventory),
            "host_names": [h.name for h in self.hosts],
            "host_groups": {h.name: h.inv.groups for h in self.hosts},
            "kernel": first.get("kernel"),
            "distribution": first.get("distribution"),
            "ifname": first.get("ifname"),
            "group_ips": self.group_ips,
            "mtu": self.mtu,
            "netem": None,
            "ipv6": None,
        }

    # -- nodes

    def stage(self, host: AnsibleHost, local: Path, name: str) -> str:
        with self._cond:
            if (host.name, name) not in self._copied:
                self._files.append({"host": host.name, "src": str(local), "name": name})
                self._copied.add((host.name, name))
        return f"{self.cell_dir(host)}/{name}"

    def submit(self, host: AnsibleHost, argv: Sequence[str], env: Mapping[str, str],
               stdout: Any, stderr: Any, text: bool) -> RemoteNode:
        if not self.is_up:
            raise TestbedError("the ansible testbed is not up")
        name = self._node_name(argv)
        node = RemoteNode(host, argv, name, env, stdout, stderr, text)
        with self._cond:
            self._pending.append(node)
            self._nodes.append(node)
            self._last_submit = time.monotonic()
            if self._launcher is None:
                self._launcher = threading.Thread(target=self._launch_loop,
                                                  name=f"run.yml-{self.run_id}", daemon=True)
                self._launcher.start()
            self._cond.notify_all()
        return node

    def _node_name(self, argv: Sequence[str]) -> str:
        """``<role>-<rank>`` for aggbox.node argv, else ``proc``; unique in the cell."""
        args = list(argv)
        base = "proc"
        if "aggbox.node" in args:
            i = args.index("aggbox.node")
            role = args[i + 1] if i + 1 < len(args) else "node"
            rank = args[args.index("--rank") + 1] if "--rank" in args else ""
            base = f"{role}-{rank}" if rank else role
        with self._cond:
            n = self._names.get(base, 0)
            self._names[base] = n + 1
        return base if n == 0 else f"{base}.{n}"

    def _launch_loop(self) -> None:
        """Gather starts that come together into one run.yml; repeat while more come."""
        while True:
            with self._cond:
                while self.is_up and time.monotonic() - self._last_submit < BATCH_QUIET_S:
                    self._cond.wait(BATCH_QUIET_S / 3)
                batch = [n for n in self._pending if not n._cancelled]
                cancelled = [n for n in self._pending if n._cancelled]
                self._pending.clear()
                files = list(self._files)
                self._files.clear()
                if not batch and not cancelled:
                    self._launcher = None  # under the lock: submit() starts a new one
                    return
            for node in cancelled:
                node._failed("cancelled before it started")
            if not self.is_up:
                for node in batch:
                    node._failed("the testbed went down before the node started")
            elif batch:
                self._launch(batch, files)

    def _launch(self, batch: list[RemoteNode], files: list[dict]) -> None:
        nodes = [{"host": n.host.name, "name": n.name, "argv": n.args,
                  "env": [f"{k}={v}" for k, v in n.env.items()]} for n in batch]
        hosts = sorted({n.host.name for n in batch})
        try:
            self.session.playbook("run.yml", {
                "aggbox_cell": self.run_id, "aggbox_nodes": nodes,
                "aggbox_files": [f for f in files if f["host"] in hosts],
                "aggbox_group_ips": self.group_ips,
            }, limit=",".join(hosts))
        except TestbedError as exc:
            failed = getattr(exc, "hosts", [])
            for node in batch:
                why = "run.yml failed on this host" if node.host.name in failed else \
                    "run.yml failed on another host"
                node._failed(f"{why}: {exc}")
            return
        for node in batch:
            try:
                node._launched()
            except OSError as exc:
                node._failed(f"cannot follow the node over ssh: {exc}")


# ---------------------------------------------------------------------------------------
# The experiment runner's entry points


def make_ansible_testbed(params: dict, netem: Netem, options: dict) -> AnsibleTestbed:
    """``make_testbed("ansible", ...)``: needs an open session (``options["session"]``),
    which ``aggbox run --testbed ansible --inventory INV`` opens for the whole run."""
    from aggbox.testbed import testbed_hosts

    _refuse_impairments(netem)
    session = options.get("session")
    if session is None:
        raise TestbedError("the ansible testbed needs an inventory: aggbox run EXPERIMENT "
                           "--testbed ansible --inventory INVENTORY")
    return session.testbed(testbed_hosts(params))
