"""Experiment files: the schema, its error messages, and how a grid becomes cells."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_fakes import experiment_text, registered

from aggbox import ROOT
from aggbox.experiment import (
    MIN_REPETITIONS,
    ExperimentError,
    estimate_seconds,
    expand,
    load_experiment,
    parse_experiment,
    shuffled,
)

GOOD = """\
name: demo
description: a demo
workload: broadcast
systems: [aggbox, tcp]
testbed: netns
params:
  hosts: [2, 4, 8]
  size: [64, 1024]
  receivers: [idle, busy]
iters: 300
warmup: 30
repetitions: 5
seed: 5
quick:
  params: {hosts: [2, 8]}
  iters: 50
  repetitions: 3
figures: [broadcast_latency]
"""


def test_full_grid_is_the_cross_product_times_repetitions():
    exp = parse_experiment(GOOD, "demo.yaml")
    cells = expand(exp, full=True)
    assert len(cells) == 3 * 2 * 2 * 5
    assert len({c.key for c in cells}) == len(cells)
    configs = {(c.params["hosts"], c.params["size"], c.params["receivers"]) for c in cells}
    assert len(configs) == 12
    assert {c.repetition for c in cells} == {0, 1, 2, 3, 4}
    assert exp.settings(full=True).iters == 300


def test_quick_mode_overrides_only_the_keys_it_names():
    exp = parse_experiment(GOOD, "demo.yaml")
    quick = exp.settings(full=False)
    assert quick.params == {"hosts": [2, 8], "size": [64, 1024], "receivers": ["idle", "busy"]}
    assert (quick.iters, quick.warmup, quick.repetitions) == (50, 30, 3)
    assert quick.systems == ("aggbox", "tcp")
    assert len(expand(exp)) == 2 * 2 * 2 * 3


def test_cells_carry_workload_defaults_but_keys_name_only_the_grid():
    cell = expand(parse_experiment(GOOD, "demo.yaml"))[0]
    grid = {"hosts": 2, "size": 64, "receivers": "idle"}
    assert list(cell.params.items())[:3] == list(grid.items())
    assert cell.params["loss"] == 0.0  # a default of the broadcast workload
    assert cell.key == "hosts=2,size=64,receivers=idle,rep=0"
    assert cell.file_name.endswith(".parquet") and "/" not in cell.file_name


def test_cell_seeds_depend_on_the_cell_not_on_the_order():
    exp = parse_experiment(GOOD, "demo.yaml")
    a = {c.key: c.seed for c in expand(exp, full=True)}
    b = {c.key: c.seed for c in shuffled(expand(exp, full=True), 99)}
    assert a == b
    assert len(set(a.values())) == len(a)


def test_run_order_is_shuffled_reproducibly():
    cells = expand(parse_experiment(GOOD, "demo.yaml"), full=True)
    one, two = shuffled(cells, 1), shuffled(cells, 1)
    assert [c.key for c in one] == [c.key for c in two]
    assert [c.key for c in one] != [c.key for c in cells]
    assert [c.key for c in shuffled(cells, 2)] != [c.key for c in one]


def test_single_values_are_accepted_as_one_element_grids():
    exp = parse_experiment(GOOD.replace("size: [64, 1024]", "size: 64"), "demo.yaml")
    assert exp.params["size"] == [64]


def _error(text: str, tmp_path: Path) -> str:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    return str(info.value)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    "old, new, line_text, words",
    [
        ("iters: 300", "iter: 300", "iter: 300", ["unknown key 'iter'", "did you mean 'iters'"]),
        ("iters: 300", "iters: many", "iters: many", ["expected an integer >= 1"]),
        ("warmup: 30", "warmup: -1", "warmup: -1", ["expected an integer >= 0"]),
        ("hosts: [2, 4, 8]", "hosts: []", "hosts: []", ["empty list"]),
        ("workload: broadcast", "workload: gossip", "workload: gossip", ["unknown workload"]),
        ("[aggbox, tcp]", "[aggbox, smoke]", "systems:", ["unknown system 'smoke'", "aggbox"]),
        ("size: [64, 1024]", "sise: [64]", "sise:", ["no parameter 'sise'", "size"]),
        ("receivers: [idle, busy]", "receivers: [idle, lazy]", "receivers:", ["one of idle, busy"]),
        ("hosts: [2, 4, 8]", "hosts: [2, 4.5]", "hosts:", ["expected an integer"]),
        ("iters: 50", "iterations: 50", "iterations: 50", ["unknown key 'iterations' in quick"]),
        ("testbed: netns", "testbed: vagrant", "testbed: vagrant", ["netns, docker, ansible"]),
        ("[broadcast_latency]", "[nope]", "figures:", ["unknown figure 'nope'"]),
        ("seed: 5", "seed: 5\nseed: 6", "seed: 6", ["appears twice"]),
        ("hosts: [2, 4, 8]", "hosts: [2, 2]", "hosts: [2, 2]", ["twice"]),
    ],
)
def test_schema_errors_name_the_file_the_line_and_what_is_expected(
    tmp_path, old, new, line_text, words
):
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    message = _error(text, tmp_path)
    assert message.startswith(f"{tmp_path / 'broken.yaml'}:{_line_of(text, line_text)}: "), message
    for word in words:
        assert word in message


def test_a_missing_required_key_is_named(tmp_path):
    message = _error(GOOD.replace("iters: 300\n", ""), tmp_path)
    assert "lacks 'iters'" in message and "integer" in message


def test_a_missing_required_parameter_is_named(tmp_path):
    text = GOOD.replace("  hosts: [2, 4, 8]\n", "")
    message = _error(text, tmp_path)
    assert f":{_line_of(text, 'params:')}:" in message and "lacks hosts" in message


def test_yaml_syntax_errors_point_at_the_line(tmp_path):
    text = GOOD.replace("iters: 300", "iters: [300")
    message = _error(text, tmp_path)
    assert "not valid YAML" in message
    assert f"{tmp_path / 'broken.yaml'}:" in message


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    assert ":1: expected a mapping" in _error("- just\n- a list\n", tmp_path)


def test_the_fake_workload_validates_like_a_real_one():
    with registered():
        exp = parse_experiment(experiment_text(), "fake.yaml")
        assert len(expand(exp)) == 4


SHIPPED = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiments_are_valid_and_repeat_every_cell(path):
    exp = load_experiment(path)
    assert not exp.smoke
    assert exp.settings(full=False).repetitions >= MIN_REPETITIONS["quick"]
    assert exp.settings(full=True).repetitions >= MIN_REPETITIONS["full"]
    full = estimate_seconds(exp, expand(exp, full=True), full=True)
    assert full < 6 * 3600, f"full mode of {path.name} is estimated at {full:.0f} s"


def test_every_shipped_quick_mode_together_fits_in_a_make_experiment():
    # `make experiment` runs every quick mode, then the report: 15 min on the 2-CPU VM.
    quick = {
        p.stem: estimate_seconds(exp, expand(exp, full=False), full=False)
        for p in SHIPPED
        for exp in [load_experiment(p)]
    }
    assert sum(quick.values()) < 13 * 60, f"quick modes estimated at {quick} s"


def test_without_repetitions_every_cell_runs_the_floor():
    exp = parse_experiment(
        GOOD.replace("repetitions: 5\n", "").replace("  repetitions: 3\n", ""), "demo.yaml"
    )
    assert exp.settings(full=False).repetitions == MIN_REPETITIONS["quick"] == 3
    assert exp.settings(full=True).repetitions == MIN_REPETITIONS["full"] == 5
    assert {c.repetition for c in expand(exp)} == {0, 1, 2}


@pytest.mark.parametrize(
    "old, new, line_text, floor",
    [
        ("repetitions: 5", "repetitions: 3", "repetitions: 3", "at least 5 times"),
        ("  repetitions: 3", "  repetitions: 2", "  repetitions: 2", "at least 3 times"),
        ("  repetitions: 3", "  repetitions: 1", "  repetitions: 1", "at least 3 times"),
    ],
)
def test_too_few_repetitions_are_refused_at_their_line(tmp_path, old, new, line_text, floor):
    text = GOOD.replace(old, new, 1)
    message = _error(text, tmp_path)
    assert message.startswith(f"{tmp_path / 'broken.yaml'}:{_line_of(text, line_text)}: ")
    assert floor in message and "smoke: true" in message and "fresh testbed" in message


def test_a_smoke_check_may_run_once_and_says_so(tmp_path):
    text = (
        GOOD.replace("repetitions: 5", "repetitions: 1").replace(
            "  repetitions: 3", "  repetitions: 1"
        )
        + "smoke: true\n"
    )
    exp = parse_experiment(text, "demo.yaml")
    assert exp.smoke and exp.settings().repetitions == 1 == exp.settings(full=True).repetitions
    bare = parse_experiment(
        GOOD.replace("repetitions: 5\n", "").replace("  repetitions: 3\n", "") + "smoke: true\n",
        "demo.yaml",
    )
    assert bare.settings().repetitions == 1
    message = _error(GOOD + "smoke: yes please\n", tmp_path)
    assert "smoke is 'yes please'" in message and "true or false" in message
