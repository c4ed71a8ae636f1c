"""The test side of a helper process driven over stdin with one JSON line per command
(tests/kernel/broadcast_node.py, tests/kernel/allreduce_node.py): start it in a host's
namespace, send commands, read answers, end it."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class NodeError(AssertionError):
    pass


class NodeClient:
    """A running helper script on one host; ``call`` sends a command and waits."""

    def __init__(self, host, script: str, args: list[str], stderr_path: Path):
        self.host = host
        self.stderr_path = stderr_path
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        with open(self.stderr_path, "wb") as err:
            self.proc = host.popen([sys.executable, script, *args], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                   cwd=REPO)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def post(self, cmd: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()

    def reply(self, wait: float = 60.0, check: bool = True) -> dict:
        try:
            line = self._lines.get(timeout=wait)
        except queue.Empty:
            raise NodeError(f"{self.host.name}: no answer in {wait} s\n"
                            f"{self.stderr_tail()}") from None
        if line is None:
            self._lines.put(None)
            raise NodeError(f"{self.host.name}: exited ({self.proc.poll()})\n"
                            f"{self.stderr_tail()}")
        answer = json.loads(line)
        if check and not answer["ok"]:
            raise NodeError(f"{self.host.name}: {answer['error']}: {answer['message']}")
        return answer

    def call(self, cmd: str, wait: float = 60.0, check: bool = True, **args) -> dict:
        """``cmd`` with ``args``; ``wait`` bounds the wait for the answer."""
        self.post(cmd, **args)
        return self.reply(wait=wait, check=check)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to close anything."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def quit(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("quit", wait=timeout)
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
