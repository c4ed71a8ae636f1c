"""A broadcast host for the kernel tests: one process per testbed host, driven over stdin.

The process lives in its host's network namespace (started with ``host.popen``), because
bpf/broadcast.c attaches to the interface of the namespace the loading process is in. It
compiles and attaches :class:`BroadcastPrograms` once at start-up, prints
``{"ok": true, "event": "ready"}`` and then answers one JSON line per command line:

    {"cmd": "receiver", "name": "a", "group": {...}}      Receiver(group, programs)
    {"cmd": "broadcaster", "name": "a", "group": {...}}   Broadcaster(group, programs)
    {"cmd": "send", "name": "a", "messages": [[size, seed], ...], "timeout": 30}
    {"cmd": "recv", "name": "a", "count": 3, "timeout": 60}   [len, sha256] per message
    {"cmd": "counters"} / {"cmd": "state", "job_id": 7} / {"cmd": "stats", "name": "a"}
    {"cmd": "inbox", "name": "a", "timeout": 0.3}   what reached a Broadcaster's socket
    {"cmd": "progs"}                                 kernel ids of the loaded programs
    {"cmd": "close", "name": "a"} / {"cmd": "quit"}

Failures are answered, not raised: ``{"ok": false, "error": "CollectiveTimeout",
"message": ..., "missing": [...]}``. The test side is :class:`NodeProcess`.

    python tests/kernel/broadcast_node.py --ifname eth0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node_client import NodeClient


def payload(size: int, seed: int) -> bytes:
    """The exact bytes of a test message (the same in every process)."""
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> list:
    return [len(data), hashlib.sha256(data).hexdigest()]


# ----------------------------------------------------------------- the node side -------


class _Node:
    def __init__(self, ifname: str):
        from aggbox.collectives.broadcast import BroadcastPrograms

        self.programs = BroadcastPrograms(ifname)
        self.endpoints: dict[str, object] = {}

    def receiver(self, name: str, group: dict) -> dict:
        from aggbox.collectives.broadcast import Receiver
        from aggbox.collectives.group import Group

        self.endpoints[name] = Receiver(Group.from_dict(group), self.programs)
        return {}

    def broadcaster(self, name: str, group: dict) -> dict:
        from aggbox.collectives.broadcast import Broadcaster
        from aggbox.collectives.group import Group

        self.endpoints[name] = Broadcaster(Group.from_dict(group), self.programs)
        return {}

    def send(self, name: str, messages: list, timeout: float) -> dict:
        """Send each message; after each, the fold map's per-member cumulative ACKs."""
        sender = self.endpoints[name]
        results = []
        for size, seed in messages:
            t0 = time.monotonic()
            try:
                seq = sender.send(payload(size, seed), timeout=timeout)
            except Exception as exc:
                exc.elapsed = time.monotonic() - t0  # how long send took to give up
                raise
            elapsed = time.monotonic() - t0
            results.append({"seq": seq, "acked": self.programs.acked(sender.group.job_id),
                            "elapsed": elapsed})
        return {"results": results}

    def recv(self, name: str, count: int, timeout: float) -> dict:
        receiver = self.endpoints[name]
        got: list = []
        for _ in range(count):
            msg = receiver.recv(timeout=timeout)
            if msg is None:
                got.append(None)
                break
            got.append(digest(msg))
        return {"messages": got}

    def rcvbuf(self, name: str, size: int) -> dict:
        """Shrink an endpoint's receive buffer (the kernel rounds up to its minimum): the
        socket then drops what its kernel's TC program has already acknowledged."""
        sock = self.endpoints[name].sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        return {"rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}

    def serve(self, name: str, duration: float) -> dict:
        """A root between sends: answer NACKs for ``duration`` seconds."""
        served = self.endpoints[name].serve(duration)
        return {"served": served}

    def counters(self) -> dict:
        return {"counters": self.programs.counters()}

    def state(self, job_id: int) -> dict:
        """The job's receive windows (member side) and ACK fold (root side), raw."""
        from aggbox.protocol import MAX_MEMBERS

        slot = self.programs._slots[job_id]
        rx = self.programs.family["rx"]
        windows = []
        for rank in range(MAX_MEMBERS):
            w = rx[rx.Key(slot * MAX_MEMBERS + rank)]
            windows.append([int(w.cum), int(w.seen)])
        fold = self.programs.family["fold"][self.programs.family["fold"].Key(slot)]
        return {"rx": windows, "group_acked": int(fold.group_acked),
                "acked": [int(v) for v in fold.acked]}

    def stats(self, name: str) -> dict:
        return {"stats": dict(self.endpoints[name].stats)}

    def inbox(self, name: str, timeout: float) -> dict:
        """Every datagram that reaches a Broadcaster's socket within ``timeout``, as
        headers (the Broadcaster itself does not read them meanwhile)."""
        from aggbox.protocol import HEADER_SIZE, Header

        sock = self.endpoints[name].sock
        deadline = time.monotonic() + timeout
        got = []
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            buf, addr = sock.recvfrom(65536, socket.MSG_DONTWAIT)
            hdr = vars(Header.unpack(buf)) if len(buf) >= HEADER_SIZE else {"short": len(buf)}
            got.append({"from": addr[0], **hdr})
        return {"packets": got}

    def progs(self) -> dict:
        """Kernel ids of the programs this process loaded (from /proc/self/fdinfo)."""
        ids = {}
        for fn, loaded in self.programs.family._loaded.items():
            info = Path(f"/proc/self/fdinfo/{loaded.fd}").read_text()
            ids[fn] = next(int(ln.split()[1]) for ln in info.splitlines()
                           if ln.startswith("prog_id:"))
        return {"progs": ids}

    def close(self, name: str) -> dict:
        endpoint = self.endpoints.pop(name, None)
        if endpoint is not None:
            endpoint.close()
        return {}

    def quit(self) -> dict:
        for name in list(self.endpoints):
            self.close(name)
        self.programs.close()
        return {}


def _answer(reply: dict) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def main() -> int:
    from aggbox.errors import CollectiveTimeout

    parser = argparse.ArgumentParser()
    parser.add_argument("--ifname", default="eth0")
    args = parser.parse_args()
    node = _Node(args.ifname)
    try:
        _answer({"ok": True, "event": "ready", "pid": os.getpid()})
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            cmd = request.pop("cmd")
            try:
                reply = {"ok": True, **getattr(node, cmd)(**request)}
            except CollectiveTimeout as exc:
                reply = {"ok": False, "error": "CollectiveTimeout", "message": str(exc),
                         "missing": exc.missing, "elapsed": getattr(exc, "elapsed", None)}
            except Exception as exc:  # noqa: BLE001 - reported to the test
                reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            _answer(reply)
            if cmd == "quit":
                return 0
    finally:
        node.programs.close()  # stdin closed (the test died) or an error: detach anyway
    return 0


# ----------------------------------------------------------------- the test side -------


class NodeProcess(NodeClient):
    """A running ``broadcast_node.py`` on one host; ``call`` sends a command and waits."""

    def __init__(self, host, stderr_dir: Path):
        super().__init__(host, __file__, ["--ifname", host.ifname],
                         stderr_dir / f"{host.name}.stderr")


@contextmanager
def running_nodes(hosts, stderr_dir: Path) -> Iterator[dict[int, NodeProcess]]:
    """A ready node on each of ``hosts`` (by host index); every one quits on exit."""
    nodes: dict[int, NodeProcess] = {}
    try:
        for h in hosts:
            nodes[h.index] = NodeProcess(h, stderr_dir)
        for node in nodes.values():
            assert node.reply(wait=240)["event"] == "ready"
        yield nodes
    finally:
        for node in nodes.values():
            if node.proc.poll() is None:
                node.post("quit")
        for node in nodes.values():
            node.quit()



if __name__ == "__main__":
    sys.exit(main())
