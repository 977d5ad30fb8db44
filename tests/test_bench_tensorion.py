"""bench/tensorion.py's protocol on a synthetic loss: the lr grid is extended until its best point
is strictly inside, runs are cached (an interrupted benchmark resumes), seeds rerun the best."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("bench_tensorion",
                                                  REPO / "bench" / "tensorion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_brackets_the_best_and_resumes(tmp_path):
    bench = _load()
    calls = []

    def run(method, lr, seed):  # a valley at lr = 0.1, beyond the starting grid's top
        calls.append((method, lr, seed))
        return {"final": {"val_loss": (math.log10(lr) + 1) ** 2 + 0.01 * seed},
                "curve": [{"epoch": 1, "test_loss": 1.0, "test_acc": 0.5}]}

    res = bench.sweep("conv", {"m": [1e-3, 3e-3, 1e-2]}, run, tmp_path, refine=True)["m"]
    grid = sorted(float(k) for k in res["grid"])
    assert res["best_inside"] and grid[0] < res["best_lr"] < grid[-1]
    assert abs(math.log10(res["best_lr"]) + 1) < 0.3  # found the valley
    assert [s["final"]["val_loss"] for s in res["seeds"]] == sorted(
        s["final"]["val_loss"] for s in res["seeds"])  # seeds 0, 1, 2 at the best lr
    n = len(calls)
    bench.sweep("conv", {"m": [1e-3, 3e-3, 1e-2]}, run, tmp_path, refine=True)
    assert len(calls) == n  # everything cached: nothing reruns
