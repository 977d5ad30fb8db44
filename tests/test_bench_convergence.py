"""bench/convergence.py's bookkeeping on synthetic run folders: best lr by final eval loss, seeds
aggregated as mean ± std, init baselines borrowing AdamW's lr, tables and plots written."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("convergence", REPO / "bench" / "convergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(root: Path, name: str, losses: list[float], eval_loss: float) -> None:
    run = root / "runs" / name
    run.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": x, "step_time_s": 1.0, "optim_time_s": 0.1}
            for i, x in enumerate(losses)]
    rows += [{"step": 0, "eval_loss": 3.0}, {"step": len(losses), "eval_loss": eval_loss}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "run.json").write_text(json.dumps({"status": "finished"}))


def test_sweep_seeds_and_report(tmp_path):
    conv = _load()
    lo, hi = conv.METHODS["adamw"][1]
    # seed 0 at both lrs: the higher lr ends with the lower eval loss, so it wins
    _fake_run(tmp_path, f"adamw_lr{lo:g}_s0", [2.0, 1.9, 1.8, 1.7], 1.9)
    _fake_run(tmp_path, f"adamw_lr{hi:g}_s0", [2.0, 1.5, 1.2, 1.0], 1.1)
    _fake_run(tmp_path, f"adamw_lr{hi:g}_s1", [2.0, 1.6, 1.3, 1.2], 1.3)
    _fake_run(tmp_path, f"adamw+pissa_lr{hi:g}_s0", [1.8, 1.4, 1.1, 0.9], 1.0)
    args = conv._parser().parse_args(["--out", str(tmp_path), "--seeds", "2", "--steps", "4",
                                      "--eval-limit", "0", "--no-math", "--report-only",
                                      "--methods", "adamw,adamw+pissa"])
    runs = conv._run_all(args, ["adamw", "adamw+pissa"], print)
    assert runs["best_lr"] == {"adamw": hi, "adamw+pissa": hi}
    res = conv._summarise(args, runs)
    row = res["methods"]["adamw"]
    assert row["seeds"] == 2
    assert row["eval_loss"][0] == statistics.mean([1.1, 1.3])
    assert abs(row["eval_loss"][1] - statistics.stdev([1.1, 1.3])) < 1e-12
    assert row["train_loss"][0] == statistics.mean([1.0, 1.2])  # last quarter = last step
    assert res["methods"]["adamw+pissa"]["seeds"] == 1  # seed 1 missing: not invented
    table = conv._table(args, res)
    assert "| adamw |" in table and "AdamW's" in table
    conv._plots(args, res)
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
