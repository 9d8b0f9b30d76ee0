"""``benchmarks/segment_speed.py`` in its tiny CPU mode: one segment per preset, timed, with ratios and targets."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import segment_speed


def test_tiny_mode_times_one_segment_per_preset(tiny_models: Path) -> None:
    figures = segment_speed.run("tiny", "cpu", presets=("turbo",), models_dir=tiny_models)
    rows = figures["presets"]
    assert list(rows) == ["exact", "turbo"] and figures["scale"] == "tiny"
    assert (rows["exact"]["steps"], rows["exact"]["guidance"], rows["turbo"]["steps"], rows["turbo"]["guidance"]) == (6, 5.0, 4, 1.0)
    for row in rows.values():
        assert row["frames"] == 13 and len(row["step_seconds"]) == row["steps"]
        assert 0 < row["denoise_seconds"] <= row["segment_seconds"]
    assert rows["exact"]["ratio_to_exact"] == 1.0 and rows["turbo"]["target_ratio"] == 0.125
    assert rows["turbo"]["meets_target"] == (rows["turbo"]["ratio_to_exact"] <= 0.125)
    assert any(note.startswith("quantize fp8") for note in rows["turbo"]["not_applied"])
    table = segment_speed.markdown(figures)
    assert "| turbo | 4 | 1 |" in table and "| exact | 6 | 5 |" in table
