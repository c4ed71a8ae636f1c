"""The fault campaign (aggbox/chaos.py, issue 11) and what a killed campaign leaves.

- the quick campaign: at least 40 cells, every one ``ok``, none skipped, every cell's
  JSON fields present;
- ``aggbox chaos`` killed with SIGKILL (its whole process group) mid-run, then
  ``aggbox testbed down --all``: no namespace, link, eBPF program, TC filter or pin of
  AggBox's is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggbox.bpf import PIN_ROOT
from aggbox.chaos import WORKLOADS, markdown_table, run_campaign, write_results
from aggbox.testbed.netns import NETNS_DIR, list_namespaces

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"workload", "fault", "verdict", "seconds", "counters", "detail"}
def test_quick_campaign_every_cell_ok(tmp_path):
    campaign = run_campaign(quick=True)
    cells = campaign["cells"]
    run_dir = write_results(campaign, tmp_path)
    failed = [f"{c['workload']}/{c['fault']}: {c['detail']}" for c in cells
              if c["verdict"] != "ok"]
    assert len(cells) >= 40
    for c in cells:
        assert FIELDS <= set(c), c
        assert c["verdict"] in ("ok", "fail")  # no "skipped"
        assert isinstance(c["counters"], dict) and c["seconds"] >= 0
    assert {c["workload"] for c in cells} == set(WORKLOADS)
    faults = {c["fault"] for c in cells}
    for needed in ("loss-20%", "burst-loss-1/10/70", "duplicate-5%", "reorder-5%",
                   "4-concurrent-jobs", "job-id-reused", "key-map-full",
                   "fuzz-non-aggbox", "fuzz-spoofed-member-ip", "aggregator-killed-restarted",
                   "reducer-killed-restarted"):
        assert needed in faults
    assert sum(f.startswith("kill-") for f in faults) == 9  # 3 workloads x before/during/after
    saved = json.loads((run_dir / "cells.json").read_text())
    assert saved["n_cells"] == len(cells)
    assert (run_dir / "table.md").read_text() == markdown_table(campaign)
    assert not failed, "cells failed:\n" + "\n".join(failed)


# ------------------------------------------------ SIGKILL mid-run, then down --all


def _bpftool_json(netns: str | None, *args: str):
    argv = ["bpftool", "-j", *args]
    if netns:
        argv = ["nsenter", f"--net={NETNS_DIR / netns}", "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []


def _attached_prog_ids(netns: str) -> set[int]:
    """Every eBPF program attached (tc, xdp) inside ``netns``."""
    ids: set[int] = set()
    for entry in _bpftool_json(netns, "net", "show"):
        for kind in ("xdp", "tc"):
            for att in entry.get(kind, []):
                for key in ("id", "prog_id"):
                    if key in att:
                        ids.add(int(att[key]))
                for prog in att.get("multi_attachments", []):
                    ids.add(int(prog["id"]))
    return ids


def _wait_for_a_cell(prefix: str, deadline: float) -> tuple[list[str], list[Path]]:
    """Wait until a cell's namespaces and its nodes' pins exist (nodes are running)."""
    while time.monotonic() < deadline:
        spaces = list_namespaces(prefix)
        runs = {ns[len(prefix) + 1:].rpartition("-")[0] for ns in spaces}
        pins = [p for r in runs for p in PIN_ROOT.glob(f"{r}-*") if any(p.iterdir())]
        if spaces and pins:
            return spaces, pins
        time.sleep(0.1)
    return [], []


def test_sigkilled_campaign_then_down_all_leaves_nothing(tmp_path, session_prefix):
    # (TMPDIR: the campaign's temporary directory, which a SIGKILL leaves, is tmp_path's)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "aggbox", "chaos", "--quick",
                             "--out", str(tmp_path), "--only", "reduce-by-key/loss-5%"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        spaces, pins = _wait_for_a_cell(session_prefix, time.monotonic() + 600)
        assert spaces and pins, "the campaign never got a cell's nodes running"
        time.sleep(0.5)  # mid-run: the nodes hold their programs
        progs = set().union(*(_attached_prog_ids(ns) for ns in spaces))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert progs, "no eBPF program was attached in the cell's namespaces"
    # What the kill left: the namespaces and the pins (no process unpinned them).
    assert all((NETNS_DIR / ns).exists() for ns in spaces)
    assert any(p.exists() for p in pins)

    down = subprocess.run([sys.executable, "-m", "aggbox", "testbed", "down", "--all"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr

    assert not list_namespaces(session_prefix)
    ip_netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert session_prefix not in ip_netns
    assert not [p for p in pins if p.exists()], "pins left under /sys/fs/bpf/aggbox"
    runs = {ns[len(session_prefix) + 1:].rpartition("-")[0] for ns in spaces}
    assert not [p for r in runs for p in PIN_ROOT.glob(f"{r}*")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                           text=True).stdout
    assert session_prefix not in links and not any(r in links for r in runs)
    # Programs go once their namespace's links are freed (asynchronously).
    deadline = time.monotonic() + 30
    alive = progs
    while alive and time.monotonic() < deadline:
        existing = {int(p["id"]) for p in _bpftool_json(None, "prog", "show")}
        alive = progs & existing
        time.sleep(0.2)
    assert not alive, f"eBPF programs of the killed run still loaded: {sorted(alive)}"
    root_net = {i for e in _bpftool_json(None, "net", "show") for k in ("xdp", "tc")
                for a in e.get(k, []) for i in [a.get("id", a.get("prog_id"))] if i}
    assert not progs & root_net
    for dev in (ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()
                if ":" in ln):
        if dev.startswith(session_prefix):
            for hook in ("ingress", "egress"):
                out = subprocess.run(["tc", "filter", "show", "dev", dev, hook],
                                     capture_output=True, text=True).stdout
                assert not out.strip(), f"tc filter left on {dev} {hook}: {out}"
