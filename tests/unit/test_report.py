"""results/REPORT.md: a verdict under each claim, like-for-like tables, graceful on old runs.

Built from SYNTHETIC runs in the current format (tests/unit/new_format_runs.py) and from
the committed references as they are (older columns); no timing is asserted.
"""

from __future__ import annotations

import argparse
import math
import re

import numpy as np
import pytest
from new_format_runs import new_format_results, old_format_results

from aggbox import report
from aggbox.report import Comparison, build_report, cells_of, verdict
from aggbox.results import bootstrap_median_ci, latest_run

VERDICT = re.compile(r"^Verdict: (met|partly met|not met|not judged) — \S.*\.$", re.M)


@pytest.fixture(scope="module")
def new_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("results-new")
    new_format_results(root)
    return root


@pytest.fixture(scope="module")
def new_report(new_dir) -> str:
    return build_report(new_dir)


@pytest.fixture(scope="module")
def old_report(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("results-old")
    old_format_results(root)
    return build_report(root)


def _section(text: str, number: int) -> str:
    parts = re.split(r"^## \d\. ", text, flags=re.M)
    return parts[number]


def _tables(text: str) -> list[list[str]]:
    return [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]


def test_a_verdict_line_under_each_of_the_three_claims(new_report):
    for i, claim in enumerate(("Broadcast", "MapReduce", "ML gradient aggregation"), 1):
        section = _section(new_report, i)
        assert section.startswith(claim)
        found = VERDICT.findall(section)
        assert len(found) == 1 and found[0] != "not judged", section[:600]
    assert "How to read a verdict" in new_report  # the rule is stated before any verdict


def test_training_verdict_states_time_against_gloo_and_fp16_and_accuracy_parity(new_report):
    section = _section(new_report, 4)
    assert section.startswith("ML gradient aggregation (training)")
    (line,) = [x for x in section.splitlines() if x.startswith("Verdict: ")]
    assert VERDICT.match(line) and "accuracy within 0.5 pp of gloo" in line
    assert "vs gloo fp16" in section and "test accuracy (%)" in section
    assert "vs fp16 compression" in section.split("\n")[2]  # the measured headline


def test_broadcast_headline_is_against_the_same_promise_baseline_with_the_papers_beside(
        new_report):
    section = _section(new_report, 1)
    assert "| configuration | same-promise baseline |" in section
    assert "paper's comparison: vs tcp (app)" in section
    rows = [r for r in _tables(section) if r[1].strip() == "tcp_kack" and "hosts" in r[0]]
    assert rows and all("%" in r[4] and "[" in r[4] for r in rows)  # change with its CI


def test_broadcast_tables_have_delivery_promise_and_cpu(new_report):
    section = _section(new_report, 1)
    assert "| hosts | system | promise | completion p50 (µs) | delivery p50 (µs) | CPU/op (µs) |" \
        in section
    rows = [r for r in _tables(section) if r[1].strip().startswith("mcast")]
    assert rows and all(r[2].strip() == "app" and r[5].strip() != "–" for r in rows)
    kack = [r for r in _tables(section) if r[1].strip() == "tcp_kack" and r[0].strip().isdigit()]
    assert kack and all(r[2].strip() == "kernel" for r in kack)


def test_mapreduce_headline_is_whole_job_time_like_for_like(new_report):
    section = _section(new_report, 2)
    assert "aggbox_nocombiner job (s)" in section and "tcp job (s)" in section
    assert "aggbox job (s)" in section and "tcp_combiner job (s)" in section
    assert "`after_last_send_s`" in section and "CPU per job" in section
    assert "reduce_s" not in section.replace("after_last_send_s", "")


def test_allreduce_is_against_the_strongest_baseline_with_gloo_beside(new_report, new_dir):
    section = _section(new_report, 3)
    run = latest_run("allreduce", new_dir)
    medians = run.samples.groupby(["workers", "floats", "system"])["time_ms"].median()
    rows = [r for r in _tables(section) if len(r) == 8 and "workers" in r[0]]
    assert len(rows) == 4
    for r in rows:
        workers = int(r[0].split()[0])
        size = 16384 if "64 KiB" in r[0] else 262144
        best = medians.loc[(workers, size)].drop("aggbox").idxmin()
        assert r[1].strip() == best
        assert r[7].strip() != "–"  # gloo beside


def test_cpu_per_operation_is_beside_every_time(new_report):
    for i in (1, 2, 3):
        heads = [r for r in _tables(_section(new_report, i)) if any("CPU" in c for c in r)]
        assert heads
    assert "CPU/op vs baseline" in new_report and "CPU/call vs baseline" in new_report


def test_overcommitted_rows_are_marked_and_explained(new_report):
    assert "† overcommitted" in new_report
    # the synthetic MapReduce run overcommits every configuration: no row may decide
    section = _section(new_report, 2)
    verdict_line = VERDICT.search(section).group(0)
    assert not verdict_line.startswith("Verdict: met")


def test_nothing_is_bold_and_tables_are_narrow(new_report, old_report):
    for text in (new_report, old_report):
        assert "**" not in text and "__" not in text.replace("__init__", "")
        for row in _tables(text):
            assert len(row) <= 8, row


def test_caveats_name_the_machine_the_extra_host_and_the_quantization_bound(new_report):
    caveats = new_report.split("## Caveats", 1)[1].split("\n## ", 1)[0]
    assert "2 shared vCPU" in caveats
    assert "extra host" in caveats and "gloo" in caveats
    assert "quantized" in caveats and "bound" in caveats
    assert "repetition" in caveats and "n = " in caveats and "kernel" in caveats
    assert "Overcommitted headline rows" in caveats
    assert "SYNTHETIC" in caveats


def test_old_runs_say_what_they_lack_instead_of_failing(old_report):
    assert len(VERDICT.findall(old_report)) == 4
    broadcast = _section(old_report, 1)
    assert "Verdict: not judged" in broadcast  # no tcp_kack in the old run
    assert "Missing:" in broadcast and "tcp_kack" in broadcast
    mapreduce = _section(old_report, 2)
    assert "predates the rename of `reduce_s`" in mapreduce
    assert "no CPU per operation" in mapreduce


def test_a_missing_experiment_is_not_judged(tmp_path):
    text = build_report(tmp_path)
    assert text.count("Verdict: not judged — not measured yet") == 4


def test_the_report_command_writes_results_report(tmp_path):
    new_format_results(tmp_path)
    parser = argparse.ArgumentParser()
    report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "--results", str(tmp_path)])
    assert args.func(args) == 0
    assert (tmp_path / "REPORT.md").read_text().startswith("# AggBox")


def _cmp(ratio: float, meets: bool, overcommitted: bool | None) -> Comparison:
    return Comparison(label=f"r={ratio}", ours="aggbox", base="b", ratio=ratio, low=ratio * 0.9,
                      high=ratio * 1.1, overcommitted=overcommitted, meets=meets)


def _v(comps) -> str:
    return verdict(comps, "−84.5%", lambda c: f"{c.ratio}", "b", "baseline")


def test_verdict_rule():
    clean_met = [_cmp(0.1, True, False), _cmp(0.12, True, False)]
    assert _v(clean_met).startswith("Verdict: met —")
    # an overcommitted miss does not spoil a met claim; an overcommitted hit does not make one
    assert _v([*clean_met, _cmp(0.5, False, True)]).startswith("Verdict: met —")
    assert _v([_cmp(0.1, True, True), _cmp(0.5, False, False)]).startswith(
        "Verdict: partly met —")
    assert _v([_cmp(0.1, True, True)]).startswith("Verdict: partly met —")
    assert _v([_cmp(0.1, True, False), _cmp(0.5, False, False)]).startswith(
        "Verdict: partly met —")
    assert _v([_cmp(0.1, True, None)]).startswith("Verdict: partly met —")  # not recorded
    assert _v([_cmp(0.5, False, False), _cmp(2.0, False, True)]).startswith(
        "Verdict: not met —")
    assert _v([]).startswith("Verdict: not judged —")


def test_a_configuration_meets_the_claim_only_with_its_ci_clear_of_no_difference(new_dir):
    run = latest_run("broadcast", new_dir)
    cells = cells_of(run, ["completion_us"])
    config, rows = cells.configs()[0]
    c = report.compare(cells, config, rows, "aggbox", "tcp", "completion_us", target=10.0,
                       label="x")
    assert c.meets == bool(c.high < 1)  # any ratio reaches a target of 10: the CI decides


def test_cells_take_the_median_ci_from_the_summary_or_compute_the_same(new_dir):
    run = latest_run("broadcast", new_dir)
    cells = cells_of(run, ["completion_us"])
    key = next(iter(cells.groups))
    row = cells.table.iloc[0]
    lo, hi = bootstrap_median_ci(cells.groups[key]["completion_us"].to_numpy(float))
    assert math.isclose(row["completion_us_ci_low"], lo, rel_tol=1e-9)
    assert math.isclose(row["completion_us_ci_high"], hi, rel_tol=1e-9)
    run.summary = run.summary.drop(columns=[c for c in run.summary if "_p50_ci_" in c])
    run.__dict__.pop("_aggbox_cells")
    again = cells_of(run, ["completion_us"]).table.iloc[0]
    assert math.isclose(again["completion_us_ci_low"], lo, rel_tol=1e-9)
    assert np.isnan(again["completion_us_p99"])  # 60 samples: no p99


def test_numbers_read_as_changes_and_speedups():
    assert report.change(0.155, 0.15, 0.16) == "−84.5% [−85.0%, −84.0%]"
    assert report.change(2.0, math.nan, math.nan) == "+100.0%"
    assert report.speedup(0.5, 0.4, 0.625) == "2.00x [1.60x, 2.50x]"
    assert report.num(1234.5) == "1 234" and report.num(0.01234) == "0.0123"
    assert report.format_bytes(4 * 262144) == "1 MiB"
