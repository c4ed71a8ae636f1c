"""Ctrl-C during `aggbox run` leaves nothing behind, and `--resume` finishes the run.

A tiny broadcast experiment (AggBox and TCP, 2 and 3 hosts) runs as a subprocess in its
own session; once its first cell's AggBox programs are attached, it gets SIGINT: the
whole process group, as a terminal's Ctrl-C sends it (the nodes get it too), or the
runner alone (``kill -INT``; it then stops the nodes itself). Then: exit code 130, none
of the run's namespaces, programs, pinned maps, testbed state files or processes left,
only the ``.tmp-<run-id>`` folder in the results; and ``--resume <run-id>`` completes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from aggbox.bpf import PIN_ROOT
from aggbox.testbed.netns import state_dir

pytestmark = pytest.mark.kernel

AGGBOX = [sys.executable, "-m", "aggbox"]
EXPERIMENT = """\
name: tiny-interrupt
description: two cells, interrupted in the first (tests/kernel/test_experiment_interrupt.py)
workload: broadcast
systems: [aggbox, tcp]
testbed: netns
params:
  hosts: [2, 3]
iters: 20
warmup: 2
smoke: true          # a pipeline check: one repetition per cell is enough
repetitions: 1
"""
CELLS = {"hosts=2,rep=0", "hosts=3,rep=0"}
START_TIMEOUT_S = 45  # until the first cell's programs are attached (BCC compiles them)
STOP_TIMEOUT_S = 30  # from SIGINT until the run has cleaned up and exited
RESUME_TIMEOUT_S = 90


def namespaces(prefix: str) -> set[str]:
    """`ip netns list` entries of this test session's prefix."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return {n for n in names if n.startswith(f"{prefix}-")}


def attached_programs(netns: str | None) -> set[int]:
    """Ids of the XDP and TC programs attached in ``netns`` (None: this namespace)."""
    cmd = ["bpftool", "-j", "net", "show"]
    if netns is not None:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:  # the namespace went away meanwhile
        return set()
    ids = set()
    for entry in json.loads(out.stdout or "[]"):
        for kind in ("xdp", "tc"):
            ids |= {int(p["id"]) for p in entry.get(kind, []) if "id" in p}
    return ids


def program_exists(prog_id: int) -> bool:
    out = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True)
    return out.returncode == 0


def run_of_namespace(netns: str, prefix: str) -> str:
    """``<prefix>-<run>-h0`` -> ``<run>``."""
    return netns[len(prefix) + 1 :].rsplit("-", 1)[0]


def processes_in_group(pgid: int) -> list[str]:
    """Live processes of process group ``pgid``, as "pid command"."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm_end = text.rindex(")")
        fields = text[comm_end + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(f"{stat.parent.name} {text[text.index('(') + 1 : comm_end]}")
    return found


@pytest.mark.parametrize("target", ["process-group", "runner-only"])
def test_ctrl_c_leaves_nothing_behind_and_the_run_resumes(target, tmp_path, session_prefix):
    spec = tmp_path / "tiny-interrupt.yaml"
    spec.write_text(EXPERIMENT)
    out = tmp_path / "results"
    exp_dir = out / "tiny-interrupt"
    log = tmp_path / "run.log"
    before = namespaces(session_prefix)
    argv = [*AGGBOX, "run", str(spec), "--out", str(out), "--no-progress", "--no-plots"]

    seen_ns: set[str] = set()
    seen_progs: set[int] = set()
    started = time.monotonic()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            # The first cell has started once its testbed is up and AggBox's programs are
            # attached in it: interrupt then, with the most to clean up.
            while not seen_progs:
                assert proc.poll() is None, f"the run ended early:\n{log.read_text()}"
                assert time.monotonic() - started < START_TIMEOUT_S, (
                    f"no AggBox program attached after {START_TIMEOUT_S} s:\n{log.read_text()}"
                )
                new = namespaces(session_prefix) - before
                seen_ns |= new
                for ns in sorted(new):
                    if not ns.endswith("-sw"):
                        seen_progs |= attached_programs(ns)
                time.sleep(0.1)
            if target == "process-group":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text()
    stopped_s = time.monotonic() - started
    assert rc == 130, f"exit code {rc}:\n{output}"

    # Nothing of the run is left on the machine.
    assert not processes_in_group(proc.pid), f"processes left: {processes_in_group(proc.pid)}"
    assert namespaces(session_prefix) == before, (
        f"namespaces left: {sorted(namespaces(session_prefix) - before)}"
    )
    left = [p for p in seen_progs if program_exists(p)]
    assert not left, f"programs of the run still loaded (attached or held): {left}"
    assert not attached_programs(None) & seen_progs, "a program of the run on the root netns"
    runs = {run_of_namespace(ns, session_prefix) for ns in seen_ns}
    assert runs, seen_ns
    pins = [p for r in runs for p in PIN_ROOT.glob(f"{r}-*")] if PIN_ROOT.is_dir() else []
    assert not pins, f"pinned maps left: {pins}"
    states = [state_dir() / f"{r}.json" for r in runs if (state_dir() / f"{r}.json").exists()]
    assert not states, f"testbed state files left: {states}"

    # Only the unfinished run's folder, with what a resume needs.
    entries = sorted(p.name for p in exp_dir.iterdir())
    assert len(entries) == 1 and entries[0].startswith(".tmp-"), entries
    run_id = entries[0].removeprefix(".tmp-")
    assert f"--resume {run_id}" in output, output
    assert (exp_dir / entries[0] / "run.json").is_file()
    assert not list((exp_dir / entries[0]).rglob(".*.part")), "a half-written file is left"

    # --resume finishes it: every cell, the summary, complete metadata.
    resumed = subprocess.run(
        [*argv, "--resume", run_id],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RESUME_TIMEOUT_S,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sorted(p.name for p in exp_dir.iterdir()) == [run_id, "latest"]
    final = exp_dir / run_id
    meta = json.loads((final / "meta.json").read_text())
    assert meta["complete"] is True and meta["run_id"] == run_id
    assert len(meta["resumed"]) == 1
    samples = pd.read_parquet(final / "samples.parquet")
    assert set(samples["cell"]) == CELLS
    assert set(samples["system"]) == {"aggbox", "tcp"}
    summary = pd.read_csv(final / "summary.csv")
    assert len(summary) == len(CELLS) * 2
    assert len(samples) == len(CELLS) * 2 * 20  # cells x systems x iters
    assert (summary["completion_us_n"] > 0).all(), summary
    assert not (final / "cells").exists() and not (final / "run.json").exists()
    assert namespaces(session_prefix) == before
    print(
        f"stopped {stopped_s:.1f} s after the start ({len(seen_progs)} programs seen); "
        f"cell times: {meta['cell_seconds']}"
    )
