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


def testbed_hosts(params: dict) -> int:
    """Hosts a cell needs: ``hosts``, or ``workers`` plus the aggregator's host, or
    ``mappers`` plus ``reducers``."""
    if "hosts" in params:
        return int(params["hosts"])
    if "mappers" in params:  # mapreduce: mapper hosts plus reducer hosts
        return int(params["mappers"]) + int(params.get("reducers", 1))
    return int(params["workers"]) + 1


def make_testbed(backend: str, params: dict, run_id: str = "",
                 options: dict | None = None) -> Testbed:
    """The testbed an experiment cell asks for: ``params["hosts"]`` hosts, with the link
    impairments ``loss`` / ``duplicate`` / ``reorder`` (percent), ``delay`` (ms) and
    ``burst_loss`` ("enter,leave,loss" percent, Gilbert-Elliott).
    ``options`` are the backend's own settings (ansible: ``inventory``)."""
    from aggbox.errors import TestbedError
    from aggbox.testbed.impair import parse_burst_loss

    enter, leave, burst_loss = parse_burst_loss(str(params.get("burst_loss", "")))
    netem = Netem(loss_pct=float(params.get("loss", 0)),
                  burst_enter_pct=enter, burst_leave_pct=leave, burst_loss_pct=burst_loss,
                  duplicate_pct=float(params.get("duplicate", 0)),
                  reorder_pct=float(params.get("reorder", 0)),
                  delay_ms=float(params.get("delay", 0)),
                  seed=int(params.get("seed", 1)))
    if backend == "netns":
        # The experiment's run id is too long for interface-safe names: the testbed
        # makes its own short one.
        return NetnsTestbed(testbed_hosts(params), netem=None if netem.is_noop() else netem,
                            tx_offload=bool(params.get("tx_offload", True)),
                            mtu=int(params.get("mtu", 1500)))
    if backend == "docker":
        from aggbox.testbed.docker import make_docker_testbed  # the docker SDK: only here

        return make_docker_testbed(params, netem)
    if backend == "ansible":
        from aggbox.testbed.ansible import make_ansible_testbed

        return make_ansible_testbed(params, netem, options or {})
    raise TestbedError(f"testbed backend {backend!r} is not available here; "
                       "known: netns, docker, ansible")


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
