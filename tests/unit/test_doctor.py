"""aggbox doctor without root: the table, the exit code, and checks that must not crash."""

from __future__ import annotations

import argparse
import io
import json
import os

import pytest

from aggbox import doctor
from aggbox.doctor import Check, Context


def ok_check(ctx: Context) -> Check:
    return Check("fine", True, "all good")


def failing_check(ctx: Context) -> Check:
    return Check("broken", False, "nothing there", fix="do the thing")


def warning_check(ctx: Context) -> Check:
    return Check("meh", False, "not ideal", fix="mount it", severity="warn")


def crashing_check(ctx: Context) -> Check:
    raise RuntimeError("boom")


@pytest.fixture
def checks(monkeypatch):
    """Replace the real checks (which touch the kernel) by the given fakes."""

    def use(*fns):
        monkeypatch.setattr(doctor, "CHECKS", list(fns))
        return doctor.run_checks()

    return use


def test_exit_code_zero_when_all_pass_or_warn(checks):
    rows = checks(ok_check, warning_check)
    assert [c.status for c in rows] == ["OK", "WARN"]
    assert doctor.exit_code(rows) == 0


def test_exit_code_nonzero_when_a_check_fails(checks):
    rows = checks(ok_check, failing_check, warning_check)
    assert doctor.exit_code(rows) == 1
    assert "broken" in doctor.summary(rows)


def test_crashing_check_is_a_failed_row_not_a_crash(checks):
    rows = checks(crashing_check, ok_check)
    assert rows[0].status == "FAIL"
    assert "boom" in rows[0].detail
    assert rows[1].ok


def test_plain_table_shows_status_detail_and_fix(checks):
    text = doctor.render_plain(checks(ok_check, failing_check))
    assert "OK    fine" in text
    assert "FAIL  broken" in text
    assert "fix: do the thing" in text
    assert text.count("fix:") == 1  # passing rows carry no fix


def test_rich_table_renders(checks):
    pytest.importorskip("rich")
    out = io.StringIO()
    doctor.render(checks(ok_check, failing_check), file=out)
    text = out.getvalue()
    assert "FAIL" in text and "broken" in text and "do the thing" in text


def test_cmd_doctor_json_and_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "CHECKS", [ok_check, failing_check])
    code = doctor.cmd_doctor(argparse.Namespace(json=True))
    rows = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [r["status"] for r in rows] == ["OK", "FAIL"]
    assert rows[1]["fix"] == "do the thing"


@pytest.mark.parametrize(
    ("release", "version"),
    [("6.18.44-fc-v669", (6, 18)), ("5.15.0-91-generic", (5, 15)), ("6.1.0-56-amd64", (6, 1)),
     ("5.4.0", (5, 4)), ("6.9-rc1", (6, 9))],
)
def test_kernel_version(release, version):
    assert doctor.kernel_version(release) == version


@pytest.mark.parametrize(
    ("bits", "ok"),
    [((12, 39), True), ((12, 21), True), ((12,), False), ((21, 39), False), ((), False)],
)
def test_privileges_from_capabilities(monkeypatch, bits, ok):
    monkeypatch.setattr(doctor, "effective_caps", lambda: sum(1 << b for b in bits))
    ctx = Context()
    assert doctor.check_privileges(ctx).ok is ok
    assert ctx.privileged is ok


def test_kernel_work_is_skipped_without_privileges():
    rows = doctor.check_trial_load(Context(privileged=False)) + doctor.check_attach(Context())
    assert [c.status for c in rows] == ["SKIP"] * 4
    assert doctor.exit_code(rows) == 1  # a skip is never a pass


def test_side_effect_free_checks_run_as_anyone(monkeypatch):
    """The real checks that create nothing: each gives a row, whoever runs them."""
    safe = [doctor.check_privileges, doctor.check_kernel, doctor.check_btf,
            doctor.check_bpf_syscall, doctor.check_bpffs, doctor.check_bcc,
            doctor.check_headers, doctor.check_tools]
    monkeypatch.setattr(doctor, "CHECKS", safe)
    rows = doctor.run_checks()
    assert len(rows) == len(safe)
    assert all(c.status in {"OK", "WARN", "FAIL"} for c in rows)
    assert all(c.ok or c.fix for c in rows)  # every problem names its fix
    assert not any("crashed" in c.detail for c in rows)


def test_stderr_captured_hides_and_returns_fd2_output():
    with doctor.stderr_captured() as captured:
        os.write(2, b"clang: error: something\n")
        assert doctor.last_line(captured()) == "clang: error: something"
