"""Start ``python -m aggbox.node`` on testbed hosts and gather their JSON-lines records.

Every workload's runner uses this: it knows nothing of the workload, only that each node
prints ``{"event": "ready"}`` when it can take traffic, then records, then exits.
Whatever happens (error, timeout, Ctrl-C), every node started here is ended on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aggbox.errors import AggBoxError
from aggbox.testbed.base import Host


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    stderr_path: Path
    records: list[dict] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def stderr_tail(self, lines: int = 12) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def cpu_placement(testbed_backend: str, placement: str = "root-alone") -> tuple[str, str]:
    """CPUs for (the measured root, everyone else) when all hosts share one machine.

    On the netns testbed every emulated host shares this machine's CPUs. Left alone, the
    members that a broadcast wakes would preempt the root on its own CPU and bill their
    application work to the root's latency, which no real deployment (one machine per
    host) has. So the root gets CPU 0 to itself and the members share the rest, for every
    system alike. Hosts that are real machines (docker excepted) are not pinned.
    ``placement="shared"`` lets every host use every CPU (the scheduler decides).
    """
    n = os.cpu_count() or 1
    if placement == "shared" or testbed_backend not in ("netns", "docker") or n < 2:
        return "", ""
    return "0", f"1-{n - 1}"


class NodeGroup:
    """Nodes of one experiment cell. Use as a context manager."""

    def __init__(self, spec: dict, python: str = sys.executable):
        self.workdir = Path(tempfile.mkdtemp(prefix="aggbox-cell-"))
        self.spec_path = self.workdir / "spec.json"
        self.spec_path.write_text(json.dumps(spec))
        self.python = python
        self.pin_tag = str(spec.get("pin_tag") or "")  # the nodes pin maps under <tag>-*
        self.nodes: list[Node] = []

    def start(self, host: Host, role: str, rank: int, cpus: str = "") -> Node:
        name = f"{role}[{rank}]@{host.name}"
        stderr_path = self.workdir / f"{role}-{rank}.stderr"
        # Containers and remote machines get their own copy of the spec (Host.put_file).
        spec_on_host = host.put_file(self.spec_path, f"{self.workdir.name}-spec.json")
        argv = [host.node_python() or self.python, "-m", "aggbox.node", role,
                "--spec", spec_on_host, "--rank", str(rank)]
        if cpus:
            argv += ["--cpus", cpus]
        env = host.node_env(dict(os.environ, PYTHONUNBUFFERED="1"))
        with open(stderr_path, "wb") as err:
            proc = host.popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                              env=env, text=True)
        node = Node(name, proc, stderr_path)
        node.reader = threading.Thread(target=self._read, args=(node,), daemon=True)
        node.reader.start()
        self.nodes.append(node)
        return node

    @staticmethod
    def _read(node: Node) -> None:
        assert node.proc.stdout is not None
        for line in node.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a stray print; records are JSON only
            if record.get("event") == "ready":
                node.ready.set()
            else:
                node.records.append(record)

    def wait_ready(self, nodes: list[Node], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes:
            while not node.ready.wait(0.05):
                if node.proc.poll() is not None:
                    raise AggBoxError(f"node {node.name} exited with {node.proc.returncode} "
                                      f"before it was ready:\n{node.stderr_tail()}")
                if time.monotonic() > deadline:
                    raise AggBoxError(f"node {node.name} not ready after {timeout:.0f} s:\n"
                                      f"{node.stderr_tail()}")

    def wait_exit(self, nodes: list[Node], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes:
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AggBoxError(f"node {node.name} still running after {timeout:.0f} s:\n"
                                  f"{node.stderr_tail()}") from None
            if node.reader:
                node.reader.join(5)
            if node.proc.returncode != 0:
                raise AggBoxError(f"node {node.name} failed (exit {node.proc.returncode}):\n"
                                  f"{node.stderr_tail()}")

    def stop_all(self, grace_s: float = 3.0) -> None:
        """SIGTERM every node still running (they detach their programs), then SIGKILL."""
        alive = [n for n in self.nodes if n.proc.poll() is None]
        for node in alive:
            with contextlib.suppress(ProcessLookupError):
                node.proc.terminate()
        deadline = time.monotonic() + grace_s
        for node in alive:
            try:
                node.proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        for node in self.nodes:  # let the readers take the last records
            if node.reader:
                node.reader.join(2)

    def close(self) -> None:
        self.stop_all()
        # Nodes unpin their maps as they close; one killed first (SIGKILL after the grace)
        # leaves them on bpffs, which no namespace deletion removes.
        from aggbox.bpf import remove_pins

        remove_pins(self.pin_tag)
        for path in self.workdir.iterdir():
            path.unlink()
        self.workdir.rmdir()

    def __enter__(self) -> NodeGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
