"""aggbox.bpf.remove_pins: what a killed node left on bpffs goes, and nothing else."""

from __future__ import annotations

from aggbox import bpf


def test_remove_pins_takes_the_tag_and_its_hosts_only(tmp_path, monkeypatch):
    monkeypatch.setattr(bpf, "PIN_ROOT", tmp_path)
    for folder in ("ab12cd-h0", "ab12cd-h1", "ab12cd-agg", "ab12cd", "ab12cdx-h0", "ff00ff-h0"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "broadcast_counters").write_text("")
    removed = bpf.remove_pins("ab12cd")
    assert sorted(p.name for p in removed) == ["ab12cd", "ab12cd-agg", "ab12cd-h0", "ab12cd-h1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab12cdx-h0", "ff00ff-h0"]


def test_remove_pins_without_a_tag_or_a_bpffs_does_nothing(tmp_path, monkeypatch):
    (tmp_path / "x-h0").mkdir()
    monkeypatch.setattr(bpf, "PIN_ROOT", tmp_path)
    assert bpf.remove_pins("") == []
    assert (tmp_path / "x-h0").is_dir()
    monkeypatch.setattr(bpf, "PIN_ROOT", tmp_path / "missing")
    assert bpf.remove_pins("x") == []
