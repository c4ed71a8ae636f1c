"""Testbeds: where the hosts of an experiment live. ``NetnsTestbed`` is the default backend."""

from aggbox.testbed.base import Host, Netem, Testbed
from aggbox.testbed.netns import (
    GROUP_MAC,
    NetnsHost,
    NetnsTestbed,
    down_all,
    down_run,
    load_testbed,
)


def make_testbed(backend: str, params: dict, run_id: str = "") -> Testbed:
    """The testbed an experiment cell asks for: ``params["hosts"]`` hosts, with the link
    impairments ``loss`` / ``duplicate`` / ``reorder`` (percent) and ``delay`` (ms)."""
    from aggbox.errors import TestbedError

    netem = Netem(loss_pct=float(params.get("loss", 0)),
                  duplicate_pct=float(params.get("duplicate", 0)),
                  reorder_pct=float(params.get("reorder", 0)),
                  delay_ms=float(params.get("delay", 0)),
                  seed=int(params.get("seed", 1)))
    if backend == "netns":
        # The experiment's run id is too long for interface-safe names: the testbed
        # makes its own short one.
        return NetnsTestbed(int(params["hosts"]), netem=None if netem.is_noop() else netem,
                            tx_offload=bool(params.get("tx_offload", True)))
    raise TestbedError(f"testbed backend {backend!r} is not available here; known: netns")


__all__ = [
    "make_testbed",
    "GROUP_MAC",
    "Host",
    "Netem",
    "NetnsHost",
    "NetnsTestbed",
    "Testbed",
    "down_all",
    "down_run",
    "load_testbed",
]
