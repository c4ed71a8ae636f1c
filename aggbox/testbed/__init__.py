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

__all__ = [
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
