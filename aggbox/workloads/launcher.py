"""Start ``python -m aggbox.node`` on testbed hosts and gather their JSON-lines records.

Every workload's runner uses this: it knows nothing of the workload, only that each node
prints ``{"event": "ready"}`` when it can take traffic, then records, then exits.
Whatever happens (error, timeout, Ctrl-C), every node started here is ended on exit.

When several nodes of a cell fail, the one that failed FIRST is the root cause and its
own message is the error raised: a failure is timed when the runner sees it (a "done"
record carrying an ``error``, or the process exiting non-zero), and the nodes that failed
because of it (a member whose root closed its connection, a worker left waiting) come
after it, summarized. Raising the first node *in the runner's wait order* that failed
showed a follower's traceback instead of the root's clear error.
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


@dataclass(frozen=True)
class Failure:
    """A node's failure as the runner saw it."""

    at: float  # time.monotonic() when the runner saw it: orders failures
    node: str
    message: str


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    stderr_path: Path
    records: list[dict] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None
    failure: Failure | None = None  # its first failure (error record or bad exit)
    stopped: bool = False  # ended by the runner (stop_all): its exit code is no failure

    def fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = Failure(time.monotonic(), self.name, message)

    def last_error_line(self) -> str:
        """The last line of its stderr that says something (a traceback's exception)."""
        lines = [ln.strip() for ln in self.stderr_tail(40).splitlines() if ln.strip()]
        return lines[-1] if lines else "(no output on stderr)"

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
                # "error": a node's report of an exception before its clean-up (which
                # makes its followers fail: the exit code comes after theirs).
                if record.get("event") in ("done", "error") and record.get("error"):
                    node.fail(str(record["error"]))
                node.records.append(record)
        code = node.proc.wait()  # stdout closed: the process is ending
        if code != 0 and not node.stopped:
            node.fail(f"exited with {code}: {node.last_error_line()}")

    def failures(self) -> list[Failure]:
        """Every node's failure so far, the first (the root cause) first."""
        return sorted((n.failure for n in self.nodes if n.failure), key=lambda f: f.at)

    def raise_root_cause(self, prefix: str = "", extra: str = "") -> None:
        """Raise AggBoxError with the first failure's own message (and its stderr, if it
        crashed), the later ones summarized after it; ``extra`` (what the runner itself
        saw, e.g. a node still running) last. Returns if nothing failed and no extra."""
        failures = self.failures()
        if not failures and not extra:
            return
        parts = []
        if failures:
            first = failures[0]
            parts.append(f"{first.node}: {first.message}")
            node = next(n for n in self.nodes if n.name == first.node)
            if first.message.startswith("exited with"):
                parts.append(node.stderr_tail())
            if len(failures) > 1:
                parts.append("after it: " + "; ".join(f"{f.node}: {f.message}"
                                                      for f in failures[1:]))
        if extra:
            parts.append(extra)
        raise AggBoxError(prefix + "\n".join(p for p in parts if p))

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

    def wait_exit(self, nodes: list[Node], timeout: float, prefix: str = "") -> None:
        """Wait until ``nodes`` have exited. If one of them exits non-zero or outlives
        ``timeout``, raise the cell's root cause (:meth:`raise_root_cause`): the first
        failure of any node, which may be another than the one waited for."""
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            node = pending[0]
            try:
                node.proc.wait(min(0.1, max(0.01, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    # Not this one yet: has another node already failed (a crash)?
                    if any(n.proc.poll() not in (None, 0) for n in pending[1:]):
                        pending.sort(key=lambda n: n.proc.poll() is None)
                    continue
                self.raise_root_cause(prefix, f"node {node.name} still running after "
                                      f"{timeout:.0f} s:\n{node.stderr_tail()}")
            if node.reader:
                node.reader.join(5)
            if node.proc.returncode != 0:
                node.fail(f"exited with {node.proc.returncode}: {node.last_error_line()}")
                self.raise_root_cause(prefix)
            pending.pop(0)

    def stop_all(self, grace_s: float = 3.0) -> None:
        """SIGTERM every node still running (they detach their programs), then SIGKILL."""
        alive = [n for n in self.nodes if n.proc.poll() is None]
        for node in alive:
            node.stopped = True
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
