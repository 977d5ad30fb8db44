"""bench/merge.py's report never replaces committed results with fewer: a ``--report-only`` on a
clone (no runs, no merges) used to rewrite merge.json/md/png as an empty table."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import merge as merge_bench  # noqa: E402

COMMITTED = BENCH / "results" / "merge"
FILES = ("merge.json", "merge.md", "merge.png")


def _clone_of_results(tmp_path: Path) -> Path:
    """The committed results without the runs and merges behind them, as on a fresh clone."""
    out = tmp_path / "merge"
    out.mkdir()
    for name in FILES:
        shutil.copy(COMMITTED / name, out / name)
    return out


def test_report_only_on_a_clone_refuses_and_writes_nothing(tmp_path, capsys):
    out = _clone_of_results(tmp_path)
    before = {name: (out / name).read_bytes() for name in FILES}
    assert merge_bench.main(["--report-only", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing written" in err[0] and "--out DIR" in err[0], err
    assert "rows/base" in err[0], err  # the first of what would be lost
    assert {name: (out / name).read_bytes() for name in FILES} == before


def test_force_replaces_and_an_empty_folder_gets_a_report(tmp_path):
    out = _clone_of_results(tmp_path)
    assert merge_bench.main(["--report-only", "--force", "--out", str(out)]) == 0
    assert json.loads((out / "merge.json").read_text())["rows"] == {}
    fresh = tmp_path / "fresh"
    assert merge_bench.main(["--report-only", "--out", str(fresh)]) == 0  # nothing to lose
    assert (fresh / "merge.md").is_file() and (fresh / "merge.png").is_file()


def test_losses_names_what_the_new_report_lacks():
    old = json.loads((COMMITTED / "merge.json").read_text())
    assert merge_bench.losses(old, old) == []
    fewer = json.loads(json.dumps(old))
    del fewer["rows"]["lora cat"]
    del fewer["rows"]["base"]["piqa"]
    del fewer["oft_mean_abs_angle"]["oft geodesic"]
    assert merge_bench.losses(old, fewer) == ["rows/base/piqa", "rows/lora cat",
                                              "oft_mean_abs_angle/oft geodesic"]
    more = json.loads(json.dumps(old))
    more["rows"]["new merge"] = {"boolq": 0.5, "piqa": 0.5}
    more["merge_seconds"] = {"lora cat": 1.0}
    assert merge_bench.losses(old, more) == []
    assert merge_bench.losses(more, old) == ["rows/new merge", "merge_seconds/lora cat"]
    assert merge_bench.losses(old, {**old, "limit": 20}) == ["limit 100 (this report: 20)"]
