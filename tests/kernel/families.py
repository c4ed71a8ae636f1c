"""The three program families attached to one testbed host, in this process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from aggbox.testbed.netns import NetnsHost


@dataclass
class Families:
    broadcast: object
    allreduce: object
    reduce: object

    def all(self) -> list:
        return [self.broadcast, self.allreduce, self.reduce]


@contextlib.contextmanager
def attached(host: NetnsHost) -> Iterator[Families]:
    """Broadcast, aggregation and reduce-by-key programs on ``host``'s interface, each at
    its own TC priority and default ports; detached on exit."""
    from aggbox.collectives.allreduce import AggregatorPrograms
    from aggbox.collectives.broadcast import BroadcastPrograms
    from aggbox.collectives.reduce_kernel import ReduceByKeyPrograms

    opened: list = []
    try:
        # One compile at a time: BCC (LLVM) cannot compile in two threads at once.
        for make, kwargs in ((BroadcastPrograms, {}), (AggregatorPrograms, {}),
                             (ReduceByKeyPrograms, {"map_entries": 1024})):
            opened.append(host.call(make, host.ifname, **kwargs))
        yield Families(*opened)
    finally:
        for programs in opened:
            host.call(programs.close)
