"""What every testbed backend provides: hosts with a name, an address and a way to run things.

A collective never knows which testbed it runs on; a testbed never knows which workload
runs on it. The contract between the two is :class:`Host` and :class:`Testbed`.
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Netem:
    """Per-link impairment applied with ``tc netem`` (both directions of every host link)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    duplicate_pct: float = 0.0
    reorder_pct: float = 0.0  # needs delay_ms > 0 to have any effect (netem's rule)
    seed: int = 1
    # Gilbert-Elliott burst loss (bpf/impair.c), percent per packet: good -> bad, bad ->
    # good, loss in the bad state; off while enter or loss is 0. E.g. 1, 10, 70.
    burst_enter_pct: float = 0.0
    burst_leave_pct: float = 0.0
    burst_loss_pct: float = 0.0

    @property
    def burst(self) -> tuple[float, float, float]:
        """(enter, leave, loss) percent; all zero without burst loss."""
        if not (self.burst_enter_pct and self.burst_loss_pct):
            return (0.0, 0.0, 0.0)
        return (self.burst_enter_pct, self.burst_leave_pct, self.burst_loss_pct)

    def is_noop(self) -> bool:
        return not (self.delay_ms or self.loss_pct or self.duplicate_pct or self.reorder_pct
                    or any(self.burst))


@dataclass
class Host:
    """One testbed host: where a workload node runs."""

    name: str  # testbed-local name, e.g. "h0"
    index: int
    ip: str
    mac: str
    ifname: str  # the host's interface towards the switch, as named inside the host
    netns: str | None = None  # netns backend: the namespace's name under /run/netns
    extra: dict = field(default_factory=dict)

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` on this host (overridden per backend)."""
        raise NotImplementedError

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on this host; kwargs go to :class:`subprocess.Popen`."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), check=check, **kwargs)

    # -- what a node needs from its host beyond a process (overridden by remote backends)

    def put_file(self, local: Path, name: str) -> str:
        """Make the local file ``local`` readable on this host as ``name`` (a plain file
        name, unique within the caller's run) and return its path there.

        Hosts that share this machine's filesystem (netns) read the file where it is;
        containers and remote machines get a copy in a folder of their own."""
        return str(local)

    def node_python(self) -> str | None:
        """The interpreter that runs ``python -m aggbox.node`` on this host; ``None``: the
        controller's own (hosts that share this machine's filesystem and .venv)."""
        return None

    def node_env(self, env: Mapping[str, str]) -> dict[str, str] | None:
        """The environment a node process gets from the controller's ``env``. Local hosts
        take it whole; remote ones pass on only what means something there."""
        return dict(env)


class Testbed(ABC):
    """A set of hosts on one L2 segment. Use as a context manager: resources go on exit."""

    hosts: list[Host]
    run_id: str
    backend: str = "abstract"

    @abstractmethod
    def up(self) -> Testbed: ...

    @abstractmethod
    def down(self) -> None: ...

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def describe(self) -> dict:
        """Metadata for results (backend, size, offloads, impairments)."""
        return {"backend": self.backend, "hosts": len(self.hosts), "run_id": self.run_id}
