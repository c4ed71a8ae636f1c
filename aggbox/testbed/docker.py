"""The docker testbed: N hosts as containers on a user-defined bridge network.

Layout of a run ``R`` with prefix ``P`` (prefix and run id as in the netns testbed)::

    network   P-R       bridge abx-<hash> in the root namespace, internal (no route out),
                        subnet 10.214.X.0/24 (X picked free), gateway .250, hosts .1, .2, ...
    containers P-R-h0 .. P-R-h(N-1)   image aggbox:latest, `sleep infinity`, eth0 = host

Each container gets NET_ADMIN and SYS_ADMIN (plus BPF and PERFMON when the engine knows
those names; Debian's engine 20.10 does not), the host's /sys/fs/bpf, and the host's
kernel headers (/lib/modules, /usr/src) read-only for BCC. Not --privileged. Nodes start
with ``docker exec`` through the SDK (:class:`ExecProcess`) and load their eBPF programs
inside their container's network namespace, on its eth0.

The host-level set-up of each container's network (sysctls, permanent neighbours, the group
addresses) is done from this process, root on the docker host, by entering the container's
network namespace, exactly as the netns testbed sets up its namespaces: /proc/sys is
read-only inside a non-privileged container. On the bridge (ours), unknown-unicast
flooding is turned off and every host's MAC is a static entry, as on the netns bridge.

Resources carry labels ``aggbox.testbed=docker``, ``aggbox.prefix`` and ``aggbox.run``;
:func:`down_all_docker` removes what a crashed run left. The engine itself is the state.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aggbox import ROOT
from aggbox.errors import SetupError, TestbedError
from aggbox.testbed.base import Host, Netem, Testbed
from aggbox.testbed.netns import (
    GROUP_MAC,
    MAX_PREFIX_LEN,
    MAX_RUN_ID_LEN,
    _batch,
    _disown,
    _own,
    _run,
    _write_sysctls,
    default_prefix,
    group_addresses,
    host_ip,
    host_mac,
    quickack_lines,
    validate_name,
)

T = TypeVar("T")

DEFAULT_IMAGE = os.environ.get("AGGBOX_IMAGE", "aggbox:latest")
HOST_IFNAME = "eth0"
SPEC_DIR = "/tmp/aggbox"  # inside a container: files put there by put_file
LABEL = "aggbox.testbed"
SUBNET_POOL = ipaddress.IPv4Network("10.214.0.0/16")
MAX_HOSTS = 240  # one /24 per run: hosts, 4 group addresses and the bridge's own address
# Capabilities eBPF needs. SYS_ADMIN covers bpf() on every kernel; BPF and PERFMON are the
# narrower 5.8+ names, added when the engine knows them (they then suffice on their own
# for most programs, but SYS_ADMIN stays: BCC's loader and bpffs pins still want it).
BASE_CAPS = ["NET_ADMIN", "SYS_ADMIN"]
NEW_CAPS = ["BPF", "PERFMON"]
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def docker_client():
    """A docker SDK client for the local engine (API version negotiated), or a SetupError
    that says how to start one."""
    try:
        import docker
    except ImportError:
        raise SetupError("the docker SDK is missing: run `make setup`") from None
    try:
        client = docker.from_env(version="auto", timeout=120)
        client.ping()
    except Exception as exc:  # DockerException, connection errors
        raise SetupError(f"the Docker engine does not answer ({exc}); start it with "
                         "`sudo make docker-up`") from None
    return client


def source_digest(root: Path = ROOT) -> str:
    """The digest docker/source-digest.sh computes: what the image carries from a checkout."""
    files = []
    for top in ("aggbox", "bpf", "docker/bpf-check"):
        for path in (root / top).rglob("*"):
            if (path.is_file() and path.suffix in (".py", ".c", ".h", ".sh")
                    and "__pycache__" not in path.parts):
                files.append(path.relative_to(root).as_posix())
    lines = "".join(f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}\n"
                    for f in sorted(files, key=lambda f: f.encode()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def bridge_name(prefix: str, run_id: str) -> str:
    """The bridge's interface name: at most 15 characters, ``abx-`` and a hash of the run."""
    return "abx-" + hashlib.sha1(f"{prefix}-{run_id}".encode()).hexdigest()[:10]


def run_subnet(run_id: str, attempt: int) -> ipaddress.IPv4Network:
    """A /24 out of 10.214.0.0/16 for a run; ``attempt`` moves on when one is taken."""
    third = (int(hashlib.sha1(run_id.encode()).hexdigest()[:4], 16) + attempt * 37) % 256
    return ipaddress.IPv4Network(f"10.214.{third}.0/24")


def gateway_ip(net: ipaddress.IPv4Network, n_groups: int) -> str:
    """The bridge's own address: just below the group addresses (docker needs one)."""
    return str(net.broadcast_address - 1 - n_groups)


# ---------------------------------------------------------------------------------------
# Processes in a container


def _sink(target: Any) -> tuple[Callable[[bytes], None], Any]:
    """(write function, reader for PIPE or None) for a Popen-style stdout/stderr target."""
    if target == subprocess.PIPE:
        r, w = os.pipe()
        return (lambda data, w=w: os.write(w, data)), (r, w)
    if target == subprocess.DEVNULL:
        return (lambda data: None), None
    if target is None:
        return (lambda data: sys.stdout.buffer.write(data)), None
    fd = target if isinstance(target, int) else target.fileno()
    fd = os.dup(fd)  # ours to close; the caller may close its file at once (launcher does)
    return (lambda data, fd=fd: _write_all(fd, data)), ("fd", fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ExecProcess:
    """A process started in a container with ``docker exec`` (docker SDK), with the part of
    :class:`subprocess.Popen` that :class:`~aggbox.workloads.launcher.NodeGroup` uses:
    ``stdout``, ``poll``, ``wait``, ``terminate``, ``kill``, ``returncode``, ``pid``.

    ``docker exec`` has no signal API; the engine reports the process's PID as seen from
    the docker host, so signals go there directly (this process is root on that host)."""

    def __init__(self, api, container: str, argv: Sequence[str], *, stdout: Any = None,
                 stderr: Any = None, env: Mapping[str, str] | None = None, text: bool = False,
                 workdir: str | None = None):
        self.args = list(argv)
        self.returncode: int | None = None
        self.stdout = self.stderr = None
        self._api = api
        self._exec_id = api.exec_create(container, self.args, stdout=True, stderr=True,
                                        environment=dict(env or {}) or None,
                                        workdir=workdir)["Id"]
        write_out, out_handle = _sink(stdout)
        if stderr == subprocess.STDOUT:
            write_err, err_handle = write_out, None
        else:
            write_err, err_handle = _sink(stderr)
        self._close_fds = [h[1] for h in (out_handle, err_handle) if h]
        if out_handle and out_handle[0] != "fd":
            self.stdout = os.fdopen(out_handle[0], "r" if text else "rb",
                                    **({"encoding": "utf-8", "errors": "replace"} if text else {}))
        if err_handle and err_handle[0] != "fd":
            self.stderr = os.fdopen(err_handle[0], "r" if text else "rb",
                                    **({"encoding": "utf-8", "errors": "replace"} if text else {}))
        stream = api.exec_start(self._exec_id, stream=True, demux=True)
        self._pump = threading.Thread(target=self._forward, args=(stream, write_out, write_err),
                                      name=f"exec-{container}", daemon=True)
        self._pump.start()
        self.pid = self._wait_pid()

    def _forward(self, stream, write_out, write_err) -> None:
        try:
            for out, err in stream:
                if out:
                    write_out(out)
                if err:
                    write_err(err)
        except Exception:  # the engine went away: poll() reports what it can
            pass
        finally:
            for fd in self._close_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _inspect(self) -> dict:
        return self._api.exec_inspect(self._exec_id)

    def _wait_pid(self) -> int:
        for _ in range(200):
            info = self._inspect()
            if info.get("Pid") or not info.get("Running"):
                return int(info.get("Pid") or 0)
            time.sleep(0.005)
        return 0

    def _finish(self) -> int | None:
        """The exit code once the engine has it (the stream ends a moment before)."""
        if self.returncode is None:
            for _ in range(100):
                info = self._inspect()
                if not info.get("Running"):
                    code = info.get("ExitCode")
                    self.returncode = int(code) if code is not None else -1
                    break
                time.sleep(0.02)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self._pump.is_alive():
            return None
        return self._finish()

    def wait(self, timeout: float | None = None) -> int:
        self._pump.join(timeout)
        if self._pump.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        code = self._finish()
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self.pid and self._inspect().get("Running"):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# Hosts and the testbed


def run_in_pid_netns(pid: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a fresh thread inside the network namespace of process ``pid``."""
    result: list[Any] = [None]
    error: list[BaseException | None] = [None]

    def work() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise TestbedError(f"setns(pid {pid}): {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            result[0] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            error[0] = exc

    thread = threading.Thread(target=work, name=f"netns-pid{pid}", daemon=True)
    thread.start()
    thread.join()
    if error[0] is not None:
        raise error[0]
    return result[0]


@dataclass
class DockerHost(Host):
    """A host that is a container; ``container`` is its name."""

    container: str = ""
    pid: int = 0  # the container's init process, as seen from the docker host
    api: Any = field(default=None, repr=False, compare=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        # For people and logs; processes themselves start through the SDK (popen/run).
        return ["docker", "exec", "-i", self.container, *argv]

    def popen(self, argv: Sequence[str], **kwargs) -> ExecProcess:
        kwargs.pop("stdin", None)  # exec'd nodes read nothing
        kwargs.pop("universal_newlines", None)
        unsupported = set(kwargs) - {"stdout", "stderr", "env", "text", "cwd"}
        if unsupported:
            raise TestbedError(f"docker hosts do not support {', '.join(sorted(unsupported))}")
        return ExecProcess(self.api, self.container, argv, stdout=kwargs.get("stdout"),
                           stderr=kwargs.get("stderr"), env=kwargs.get("env"),
                           text=bool(kwargs.get("text")), workdir=kwargs.get("cwd"))

    def run(self, argv: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        text = kwargs.get("text", True)
        proc = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
                          env=kwargs.get("env"))
        out_box: list[Any] = []
        reader = threading.Thread(target=lambda: out_box.append(proc.stderr.read()), daemon=True)
        reader.start()
        out = proc.stdout.read()
        code = proc.wait(kwargs.get("timeout"))
        reader.join()
        done = subprocess.CompletedProcess(list(argv), code, out, out_box[0] if out_box else "")
        if check and code != 0:
            raise subprocess.CalledProcessError(code, list(argv), done.stdout, done.stderr)
        return done

    def put_file(self, local: Path, name: str) -> str:
        data = Path(local).read_bytes()
        buf = io.BytesIO()
        parent, folder = SPEC_DIR.rsplit("/", 1)
        with tarfile.open(fileobj=buf, mode="w") as tar:
            entry = tarfile.TarInfo(folder)
            entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(entry)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        self.api.put_archive(self.container, parent, buf.getvalue())
        return f"{SPEC_DIR}/{name}"

    def node_python(self) -> str:
        return "python3"  # the image's Debian Python; PYTHONPATH=/opt/aggbox finds the package

    def node_env(self, env: Mapping[str, str]) -> dict[str, str]:
        # The controller's paths and venv mean nothing in the container; the image sets
        # its own. Only what changes a node's behaviour goes across.
        return {k: v for k, v in env.items() if k == "PYTHONUNBUFFERED" or k.startswith("AGGBOX_")
                and k not in ("AGGBOX_STATE_DIR",)}

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in a thread of this process inside the container's network namespace."""
        return run_in_pid_netns(self.pid, fn, *args)


_caps_known: dict[str, list[str]] = {}


class DockerTestbed(Testbed):
    """N containers on one internal bridge network. ``with DockerTestbed(4) as tb: ...``"""

    backend = "docker"

    def __init__(self, n_hosts: int, run_id: str | None = None, image: str = DEFAULT_IMAGE,
                 prefix: str | None = None, mtu: int = 1500, group_ips: int = 4,
                 tx_offload: bool = True, check_image: bool = True):
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise TestbedError(f"the docker testbed takes 1..{MAX_HOSTS} hosts, got {n_hosts}")
        self.prefix = validate_name("prefix", prefix or default_prefix(), MAX_PREFIX_LEN)
        self.run_id = validate_name("run id", run_id or secrets.token_hex(3), MAX_RUN_ID_LEN)
        self.n_hosts, self.image, self.mtu, self.tx_offload = n_hosts, image, mtu, tx_offload
        self.n_groups, self.check_image = group_ips, check_image
        self.name = f"{self.prefix}-{self.run_id}"
        self.bridge = bridge_name(self.prefix, self.run_id)
        self.hosts: list[DockerHost] = []
        self.group_ips: list[str] = []
        self.subnet = ""
        self.caps: list[str] = []
        self.engine_version = ""
        self.image_id = ""
        self.image_digest = ""
        self.image_stale = False
        self.is_up = False
        self._client = None
        self._network = None

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL: "docker", "aggbox.prefix": self.prefix, "aggbox.run": self.run_id}

    # -- life cycle

    def up(self) -> DockerTestbed:
        if os.geteuid() != 0:
            raise TestbedError("the docker testbed sets up container networking from the docker "
                               "host: run it as root")
        self._client = docker_client()
        self._check_image()
        _own(self)  # from here on, exit and SIGTERM tear it down
        try:
            self._create_network()
            self._create_containers()
            self._setup_bridge()
            for host in self.hosts:
                host.call(self._setup_host, host)
            self.is_up = True
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Remove the run's containers and network; idempotent, and also after a crash."""
        _disown(self)
        client = self._client
        if client is None:
            return
        _remove_resources(client, {"aggbox.run": self.run_id, "aggbox.prefix": self.prefix})
        self.is_up = False

    def _check_image(self) -> None:
        import docker

        try:
            image = self._client.images.get(self.image)
        except docker.errors.ImageNotFound:
            raise SetupError(f"no image {self.image}: build it with `sudo make image`") from None
        self.image_id = image.id
        self.image_digest = (image.labels or {}).get("aggbox.source-digest", "")
        # A warning, not an error: in a tree others edit, sources change under a running
        # experiment; the run's meta.json says which sources its image was built from.
        if self.check_image and self.image_digest and self.image_digest != source_digest():
            self.image_stale = True
            print(f"aggbox: warning: image {self.image} was built from other sources than "
                  "this checkout (aggbox/ or bpf/ changed since); `sudo make image` rebuilds "
                  "it", file=sys.stderr)
        self.engine_version = self._client.version().get("Version", "")

    def _create_network(self) -> None:
        import docker

        options = {"com.docker.network.bridge.name": self.bridge,
                   "com.docker.network.driver.mtu": str(self.mtu)}
        last: Exception | None = None
        for attempt in range(12):
            net = run_subnet(self.run_id, attempt)
            ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(
                subnet=str(net), gateway=gateway_ip(net, self.n_groups))])
            try:
                self._network = self._client.networks.create(
                    self.name, driver="bridge", internal=True, ipam=ipam, options=options,
                    labels=self.labels)
            except docker.errors.APIError as exc:
                if "overlap" in str(exc).lower():
                    last = exc
                    continue  # another network has this /24: try the next
                raise TestbedError(f"cannot create docker network {self.name}: {exc}") from None
            self.subnet = str(net)
            self.group_ips = group_addresses(net, self.n_groups)
            return
        raise TestbedError(f"no free /24 in {SUBNET_POOL} for network {self.name}: {last}")

    def _capabilities(self) -> list[str]:
        """NET_ADMIN + SYS_ADMIN, plus BPF and PERFMON if the engine accepts the names
        (probed once per engine with a container that is created and removed at once)."""
        import docker

        key = self.engine_version
        if key not in _caps_known:
            probe = f"{self.name}-capprobe"
            try:
                c = self._client.containers.create(self.image, ["true"], name=probe,
                                                   cap_add=BASE_CAPS + NEW_CAPS,
                                                   network_mode="none", labels=self.labels)
                c.remove(force=True)
                _caps_known[key] = BASE_CAPS + NEW_CAPS
            except docker.errors.APIError as exc:
                if "capabilit" not in str(exc).lower():
                    raise TestbedError(f"cannot create a container from {self.image}: "
                                       f"{exc}") from None
                _caps_known[key] = list(BASE_CAPS)
        return _caps_known[key]

    def _create_containers(self) -> None:
        api = self._client.api
        self.caps = self._capabilities()
        net = ipaddress.IPv4Network(self.subnet)
        binds = {
            "/sys/fs/bpf": {"bind": "/sys/fs/bpf", "mode": "rw"},  # pins (aggbox stats)
            "/lib/modules": {"bind": "/lib/modules", "mode": "ro"},  # BCC: the host's headers
            "/usr/src": {"bind": "/usr/src", "mode": "ro"},  # (build/ links point here)
        }
        for i in range(self.n_hosts):
            name = f"{self.name}-h{i}"
            ip, mac = host_ip(net, i), host_mac(self.run_id, i)
            host_config = api.create_host_config(cap_add=self.caps, binds=binds,
                                                 network_mode=self.name)
            networking = api.create_networking_config(
                {self.name: api.create_endpoint_config(ipv4_address=ip)})
            created = api.create_container(
                self.image, ["sleep", "infinity"], name=name, hostname=f"h{i}",
                mac_address=mac, host_config=host_config, networking_config=networking,
                labels=self.labels, detach=True)
            api.start(created["Id"])
            pid = int(api.inspect_container(created["Id"])["State"]["Pid"])
            self.hosts.append(DockerHost(name=f"h{i}", index=i, ip=ip, mac=mac,
                                         ifname=HOST_IFNAME, container=name, pid=pid, api=api))

    def _setup_bridge(self) -> None:
        """No unknown-unicast flooding, static MACs: what the netns bridge has (without it,
        members see and acknowledge in their kernel copies meant for others)."""
        lines, links = [], []
        for host in self.hosts:
            peer = host.call(_iflink, HOST_IFNAME)
            port = _ifname_by_index(peer)
            links.append(f"link set dev {port} type bridge_slave flood off")
            lines.append(f"fdb replace {host.mac} dev {port} master static")
        _batch("ip", links)
        _batch("bridge", lines)

    def _setup_host(self, host: DockerHost) -> None:
        # Runs inside the container's network namespace (see the module docstring).
        _write_sysctls({
            "net.ipv4.conf.all.rp_filter": "0",
            f"net.ipv4.conf.{HOST_IFNAME}.rp_filter": "0",
            "net.ipv4.conf.all.accept_local": "1",
            f"net.ipv4.conf.{HOST_IFNAME}.accept_local": "1",
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
            # AggBox's UDP ports lie in the ephemeral range: no connection of the container
            # gets one (as provision.yml does on VMs: aggbox_reserved_ports).
            "net.ipv4.ip_local_reserved_ports": "47000-49999",
        })
        lines = [f"neigh replace {o.ip} lladdr {o.mac} dev {HOST_IFNAME} nud permanent"
                 for o in self.hosts if o is not host]
        lines += [f"neigh replace {g} lladdr {GROUP_MAC} dev {HOST_IFNAME} nud permanent"
                  for g in self.group_ips]
        # As on the netns testbed: tcp_kack's members ACK at once, other TCP keeps defaults.
        lines += quickack_lines(ipaddress.IPv4Network(self.subnet), host.ip, HOST_IFNAME)
        _batch("ip", lines)
        if not self.tx_offload:
            _run(["ethtool", "-K", HOST_IFNAME, "tx", "off"])

    def describe(self) -> dict:
        return {
            **super().describe(),
            "image": self.image,
            "image_id": self.image_id,
            "image_source_digest": self.image_digest,
            "image_stale": self.image_stale,
            "engine": self.engine_version,
            "capabilities": self.caps,
            "network": self.name,
            "subnet": self.subnet,
            "mtu": self.mtu,
            "tx_offload": self.tx_offload,
            "netem": None,
            "ipv6": False,
        }


def _iflink(ifname: str) -> int:
    """The ifindex of ``ifname``'s veth peer, asked over netlink from inside the container's
    namespace (/sys/class/net would show the docker host's interfaces: sysfs belongs to
    the namespace that mounted it)."""
    out = _run(["ip", "-j", "link", "show", "dev", ifname])
    return int(json.loads(out)[0]["link_index"])


def _ifname_by_index(ifindex: int) -> str:
    for path in Path("/sys/class/net").iterdir():
        try:
            if int((path / "ifindex").read_text()) == ifindex:
                return path.name
        except (OSError, ValueError):
            continue
    raise TestbedError(f"no interface with index {ifindex} on the docker host")


def _remove_resources(client, labels: dict[str, str]) -> tuple[list[str], list[str]]:
    """Remove containers, then networks, carrying all of ``labels``; returns their names."""
    filters = {"label": [f"{LABEL}=docker", *(f"{k}={v}" for k, v in labels.items())]}
    containers = client.containers.list(all=True, filters=filters)
    for c in containers:
        try:
            c.remove(force=True)
        except Exception as exc:
            if "No such container" not in str(exc) and "already in progress" not in str(exc):
                raise
    networks = client.networks.list(filters=filters)
    for n in networks:
        try:
            n.remove()
        except Exception as exc:
            if "not found" not in str(exc).lower():
                raise
    return [c.name for c in containers], [n.name for n in networks]


def list_docker_resources(prefix: str = "abx") -> tuple[list[str], list[str]]:
    """(containers, networks) of docker testbeds under ``prefix``; empty without an engine."""
    try:
        client = docker_client()
    except SetupError:
        return [], []
    filters = {"label": [f"{LABEL}=docker", f"aggbox.prefix={prefix}"]}
    return ([c.name for c in client.containers.list(all=True, filters=filters)],
            [n.name for n in client.networks.list(filters=filters)])


def down_all_docker(prefix: str = "abx") -> tuple[list[str], list[str]]:
    """Remove every docker testbed container and network under ``prefix``."""
    try:
        client = docker_client()
    except SetupError:
        return [], []
    return _remove_resources(client, {"aggbox.prefix": prefix})


def make_docker_testbed(params: dict, netem: Netem) -> DockerTestbed:
    if not netem.is_noop():
        raise TestbedError("link impairments (loss, delay, duplicate, reorder) are emulated on "
                           "the netns testbed only; run this cell with --testbed netns")
    from aggbox.testbed import testbed_hosts

    return DockerTestbed(testbed_hosts(params), tx_offload=bool(params.get("tx_offload", True)),
                         mtu=int(params.get("mtu", 1500)))
