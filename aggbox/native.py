"""A worker's C loops (aggbox/edge.c), compiled once per machine and loaded with ctypes.

aggbox/quant.py calls the edge's float32 loops when they load, and its numpy path
otherwise: the results are bit for bit the same either way (tests/unit/test_native_edge.py),
only the speed differs (``aggbox bench quant`` shows which path ran). The allreduce worker
(aggbox/collectives/allreduce.py) sends its blocks and takes its plain results through
:class:`Blocks`, and falls back to its Python socket calls the same way.

The shared library is built with the machine's C compiler (``$CC``, else cc, gcc or
clang) with ``-march=native`` into ``$AGGBOX_CACHE`` (default ``~/.cache/aggbox``), named
after a hash of the source, the flags, the compiler and the CPU's feature flags: another
CPU (an image moved to another host) gets its own build, never an instruction it lacks.
A build is written under a temporary name and renamed, so processes that start together
(the workers of one run) may all build, and none loads a half-written file.
``AGGBOX_NATIVE=0`` turns the C path off; ``aggbox doctor`` says which path is in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from aggbox import BPF_DIR

SOURCE = Path(__file__).with_name("edge.c")
WIRE_HEADER = BPF_DIR / "aggbox.h"  # the header layout, shared with the kernel programs
# no -ffast-math: rintf must round half to even and x * s must round like numpy's
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
BUILD_TIMEOUT_S = 120



class Blocks(ctypes.Structure):
    """One allreduce call's blocks as edge.c's socket loops see them (struct
    aggbox_blocks): pointers into the call's numpy arrays, which the call keeps alive."""

    _fields_ = [("headers", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("out_exp", ctypes.c_void_p),
                ("done", ctypes.c_void_p), ("block", ctypes.c_int64),
                ("size", ctypes.c_int64), ("n_blocks", ctypes.c_int64),
                ("base", ctypes.c_uint32), ("aggregator_ip", ctypes.c_uint32),
                ("aggregator_port", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("job_id", ctypes.c_uint32), ("token", ctypes.c_uint32),
                ("epoch", ctypes.c_int32), ("y", ctypes.c_void_p), ("bits", ctypes.c_int32),
                ("n_mean", ctypes.c_int32), ("dequantized", ctypes.c_int64),
                ("deq_failed", ctypes.c_int32), ("n_workers", ctypes.c_int32),
                ("pad2", ctypes.c_int32), ("tags", ctypes.c_void_p),
                ("k0", ctypes.c_uint64), ("k1", ctypes.c_uint64)]


class Progress(ctypes.Structure):
    """A call's progress as edge.c's run loop and the caller share it (struct
    aggbox_progress): the window, per-block send times and resend marks (the call's
    numpy arrays), and counters the loop adds to (the caller folds and zeroes them)."""

    _fields_ = [("sent_at", ctypes.c_void_p), ("resent", ctypes.c_void_p),
                ("fast_resent", ctypes.c_void_p), ("low", ctypes.c_int64),
                ("next_send", ctypes.c_int64), ("pool", ctypes.c_int64),
                ("fast_gap", ctypes.c_int64), ("spin_s", ctypes.c_double),
                ("sent", ctypes.c_int64), ("results", ctypes.c_int64),
                ("fast_retransmits", ctypes.c_int64), ("waits", ctypes.c_int64),
                ("spin_hits", ctypes.c_int64), ("spin_misses", ctypes.c_int64),
                ("rtts", ctypes.c_void_p), ("rtts_cap", ctypes.c_int64),
                ("n_rtts", ctypes.c_int64), ("progress_at", ctypes.c_double),
                ("refused", ctypes.c_int64)]

    COUNTERS = ("sent", "results", "fast_retransmits", "waits", "spin_hits", "spin_misses",
                "refused")


#: aggbox_run's answers
RUN_DONE, RUN_OTHER, RUN_IDLE, RUN_INTR = 0, 1, 2, 3

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_BLOCKS = ctypes.POINTER(Blocks)
_SIGNATURES = {
    "aggbox_quantize_own_f32": [_P, _I64, _I64, _INT, _P, _P],
    "aggbox_quantize_f32": [_P, _I64, _I64, _INT, _P, _P],
    "aggbox_dequantize_f32": [_P, _I64, _I64, _INT, _P, ctypes.c_int32, _P],
    "aggbox_send_blocks": [_INT, _BLOCKS, _P, _I64, _I64],
    "aggbox_quantize_call": [_P, _BLOCKS],
    "aggbox_run": [_INT, _BLOCKS, ctypes.POINTER(Progress), ctypes.c_double, ctypes.c_double],
    "aggbox_header_tag": [ctypes.c_uint64, ctypes.c_uint64, _P],
}
#: what a function returns, if not an int
_RESTYPES = {"aggbox_header_tag": ctypes.c_uint64}

_library: ctypes.CDLL | None = None
_tried = False
#: why the C path is off ("" while it is on or not yet tried)
unavailable_reason = ""


def cache_dir() -> Path:
    return Path(os.environ.get("AGGBOX_CACHE") or Path.home() / ".cache" / "aggbox")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build(cc: str) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), WIRE_HEADER.read_bytes(), " ".join(FLAGS).encode(),
                 cc.encode(), _cpu_flags().encode()):
        digest.update(part)
    target = cache_dir() / f"edge-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".edge-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, f"-I{WIRE_HEADER.parent}", "-o", tmp, str(SOURCE)],
                             capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if run.returncode != 0:
            raise OSError(f"{Path(cc).name} failed: {run.stderr.strip()[:300]}")
        os.replace(tmp, target)  # atomic: a concurrent loader sees all of it or nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded edge library, or None (then :data:`unavailable_reason` says why)."""
    global _library, _tried, unavailable_reason
    if _tried:
        return _library
    _tried = True
    if os.environ.get("AGGBOX_NATIVE", "1").lower() in ("0", "no", "false", "off"):
        unavailable_reason = "AGGBOX_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        unavailable_reason = "no C compiler (cc, gcc or clang) on PATH"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name, ctypes.c_int)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        unavailable_reason = f"the C edge did not build or load: {exc}"
        return None
    _library = lib
    return lib


def status() -> str:
    """One line: which edge path quantize and dequantize take on this machine."""
    lib = library()
    return "C (aggbox/edge.c)" if lib is not None else f"numpy ({unavailable_reason})"
