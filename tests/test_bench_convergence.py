"""bench/convergence.py's protocol and bench/convergence_report.py's statistics, on synthetic run
folders: grids extended until the best lr is inside, seeds and ablations started only then,
diverged runs ranked last, steps-to-target interpolation, the paired bootstrap interval, the
report written end to end, and the per-run records that let the protocol go on without the run
folders."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval import runner

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module("convergence"), importlib.import_module("convergence_report")
    finally:
        sys.path.remove(str(REPO / "bench"))


def _args(conv, out: Path, *extra: str):
    return conv.parser().parse_args(["--out", str(out), "--steps", "30", "--eval-every", "10",
                                     "--eval-limit", "4", *extra])


def _fake_run(out: Path, name: str, eval_losses: list[float], status: str = "finished") -> Path:
    """A run folder as the driver leaves it: held-out loss at steps 0, 10, 20, ..."""
    run = out / "runs" / name
    run.mkdir(parents=True)
    rows = [{"step": s, "loss": 2.0 - 0.01 * s, "step_time_s": 1.0}
            for s in range(1, 10 * (len(eval_losses) - 1) + 1)]
    rows += [{"step": 10 * i, "eval_loss": x} for i, x in enumerate(eval_losses)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "run.json").write_text(json.dumps({"status": status}))
    return run


def _fake_eval(run: Path, correct: dict[str, list[int]], rep, limit: int = 4,
               base: dict[str, list[int]] | None = None) -> None:
    """eval/results.json and the per-document samples of the adapter (label = run name) and,
    given ``base``, of the base model (label "base")."""
    (run / "eval").mkdir()
    tasks = [t for p in rep.SUITE_TASKS.values() for t in p]
    models = {run.name: correct, **({"base": base} if base else {})}
    suite = {"limit": limit, "models": {}}
    for label, right in models.items():
        results = {t: {"acc,none": float(np.mean(right.get(t, [0] * limit)))} for t in tasks}
        for t in rep.SUITE_TASKS["b"]:  # protocol (b) also reports whether an answer was extracted
            results[t]["answered,none"] = 0.75
        suite["models"][label] = {"results": results}
        # the eval stage's own file name for a model's samples
        with open(run / "eval" / f"samples_commonsense_{runner._slug(label)}.jsonl", "w") as fh:
            for t in tasks:
                for d, ok in enumerate(right.get(t, [0] * limit)):
                    fh.write(json.dumps({"task": t, "doc_id": d, "acc": ok}) + "\n")
    (run / "eval" / "results.json").write_text(json.dumps({"suites": {"commonsense": suite}}))


def _names(jobs) -> list[str]:
    return [f"{j.kind}:{j.name}" for j in jobs]


def test_next_lr_walks_the_1_3_series(bench):
    conv, _ = bench
    assert [conv.next_lr(x, +1) for x in (1e-3, 3e-3, 3e-4, 0.3)] == [3e-3, 1e-2, 1e-3, 1.0]
    assert [conv.next_lr(x, -1) for x in (1e-3, 3e-3, 1e-2, 0.1)] == [3e-4, 1e-3, 3e-3, 3e-2]


def test_grid_is_extended_until_the_best_is_inside(bench, tmp_path):
    conv, _ = bench
    a = _args(conv, tmp_path, "--methods", "adamw", "--seeds", "2")
    grid = conv.METHODS["adamw"].grid
    # The largest lr ends lowest: the grid is not bracketed, so no seed may start yet.
    for k, lr in enumerate(grid):
        _fake_run(tmp_path, conv.run_name("adamw", lr, 0), [3.0, 2.0, 1.0 - 0.1 * k])
    proto = conv.Protocol(a)
    up = conv.next_lr(max(grid), +1)
    assert _names(proto.pending()) == [f"train:{conv.run_name('adamw', up, 0)}"]
    assert proto.best_lr("adamw") is None
    # The added point is worse: the best is now strictly inside, seed 1 and the eval follow.
    _fake_run(tmp_path, conv.run_name("adamw", up, 0), [3.0, 2.0, 5.0])
    proto.records.sync()
    best = max(grid)
    assert proto.best_lr("adamw") == best and proto.grid("adamw").bracketed
    # the adapter on this machine is scored first: a fresh clone would have to train it again
    assert _names(proto.pending()) == [f"eval:{conv.run_name('adamw', best, 0)}",
                                       f"train:{conv.run_name('adamw', best, 1)}"]


def test_extension_stops_after_max_extend_points(bench, tmp_path):
    conv, _ = bench
    a = _args(conv, tmp_path, "--methods", "adamw", "--seeds", "1", "--eval-limit", "0")
    lr, k = min(conv.METHODS["adamw"].grid), 0
    points = list(conv.METHODS["adamw"].grid)
    for _ in range(conv.MAX_EXTEND):
        points.append(lr := conv.next_lr(lr, -1))
    for k, p in enumerate(sorted(points, reverse=True)):  # smaller is always better
        _fake_run(tmp_path, conv.run_name("adamw", p, 0), [3.0, 1.0 - 0.01 * k])
    proto = conv.Protocol(a)
    proto.records.sync()
    g = proto.grid("adamw")
    assert sorted(g.points) == sorted(points) and not g.bracketed
    assert proto.best_lr("adamw") == min(points)  # capped: used, and reported unbracketed
    assert proto.pending() == []


def test_ablations_wait_for_the_lr_they_borrow(bench, tmp_path):
    conv, _ = bench
    a = _args(conv, tmp_path, "--methods", "adamw,stella,riemannion+loi+rms", "--seeds", "1",
              "--eval-limit", "0")
    grid = conv.METHODS["adamw"].grid
    for lr in grid:  # the second point is best
        _fake_run(tmp_path, conv.run_name("adamw", lr, 0), [3.0, 1.0 + abs(lr - grid[1])])
    jobs = _names(conv.Protocol(a).pending())
    centre = grid[1]
    assert f"train:{conv.run_name('stella', centre, 0)}" in jobs
    rms = [conv.run_name("riemannion+loi+rms", lr, 0)
           for lr in (conv.next_lr(centre, -1), centre, conv.next_lr(centre, +1))]
    assert sorted(jobs) == sorted([f"train:{n}" for n in rms]
                                  + [f"train:{conv.run_name('stella', centre, 0)}"])


def test_a_diverged_run_ranks_last(bench, tmp_path):
    conv, _ = bench
    a = _args(conv, tmp_path, "--methods", "adamw", "--seeds", "1", "--eval-limit", "0")
    grid = conv.METHODS["adamw"].grid
    for lr in grid[:-1]:
        _fake_run(tmp_path, conv.run_name("adamw", lr, 0), [3.0, 2.0 - lr])
    run = _fake_run(tmp_path, conv.run_name("adamw", grid[-1], 0), [3.0], status="running")
    (run / "diverged.txt").write_text("training diverged at step 3\n")
    proto = conv.Protocol(a)
    assert f"{run.name}.train" in proto.records.sync()
    assert conv.final_eval_loss(proto.records.train(run.name)) == float("inf")
    assert proto.best_lr("adamw") == grid[-2]


def test_steps_to_90_percent_of_the_drop_ignores_plateau_noise(bench):
    """Two curves equal to 0.02 everywhere: AdamW's evaluation at step 20 dips by noise to its
    final level, which makes the other run look 3.6x slower to reach it; the 90 % level, on the
    steep part, finds the two equally fast."""
    _, rep = bench
    steps = list(range(0, 110, 10))
    adamw = {"eval_steps": steps,
             "eval_loss": [3.0, 0.5, 0.19, 0.22, 0.21, 0.21, 0.2, 0.2, 0.2, 0.2, 0.2]}
    other = {"eval_steps": steps,
             "eval_loss": [3.0, 0.5, 0.21, 0.22, 0.21, 0.21, 0.21, 0.2, 0.2, 0.2, 0.2]}
    rows = {"adamw": {"runs": ["adamw_lr0.001_s0"], "curves": [adamw]},
            "riemannion+loi": {"runs": ["riemannion+loi_lr0.001_s0"], "curves": [other]}}
    rep._convergence_speed(rows)
    final = rows["riemannion+loi"]["to_adamw_final"][0]  # level 0.2 (mean of steps 70..100)
    assert final["adamw_steps"] == pytest.approx(10 + 10 * 0.3 / 0.31) and final["steps"] == 70
    assert final["ratio"] > 3.5
    to90 = rows["riemannion+loi"]["to_adamw_90"][0]  # level 0.2 + 0.1 * (3.0 - 0.2) = 0.48
    assert to90["target"] == pytest.approx(0.48)
    assert to90["adamw_steps"] == pytest.approx(10 + 10 * 0.02 / 0.31)
    assert to90["steps"] == pytest.approx(10 + 10 * 0.02 / 0.29)
    assert to90["ratio"] == pytest.approx(1.0, abs=0.01)


def test_steps_to_interpolates_between_evaluations(bench):
    _, rep = bench
    c = {"eval_steps": [0, 10, 20, 30], "eval_loss": [3.0, 2.0, 1.0, 0.5]}
    assert rep.steps_to(c, 1.5) == pytest.approx(15.0)
    assert rep.steps_to(c, 2.0) == 10.0
    assert rep.steps_to(c, 0.4) is None
    assert rep.steps_to(c, 5.0) == 0.0


def test_difference_interval(bench):
    _, rep = bench
    rng = np.random.default_rng(1)
    n = 50

    def runs(p_correct: float, seeds: int) -> list[dict]:
        return [{"docs": {t: dict(enumerate((rng.random(n) < p_correct).astype(float)))
                          for t in rep.SUITE_TASKS["b"]}} for _ in range(seeds)]

    same = runs(0.5, 1) * 3
    d = rep.difference(same, same, "b", rng)
    assert d["diff"] == 0.0 and d["ci95"] == [0.0, 0.0]  # identical answers: no spread at all
    better, worse = runs(0.9, 3), runs(0.3, 3)
    d = rep.difference(better, worse, "b", rng)
    # 60 points apart on 400 documents per method: far outside any resampling noise.
    assert 50 < d["diff"] < 70 and d["ci95"][0] > 40 and d["ci95"][0] < d["diff"] < d["ci95"][1]
    close = rep.difference(runs(0.5, 3), runs(0.5, 3), "b", rng)
    assert close["ci95"][0] < 0 < close["ci95"][1]  # same accuracy: the interval covers 0
    # One task apart, the rest identical: that task alone carries the whole difference.
    first = rep.SUITE_TASKS["b"][0]
    mixed = [{"docs": {**s["docs"], first: b["docs"][first]}} for s, b in zip(same, better)]
    one = rep.difference(mixed, same, "b", rng, [first])
    rest = rep.difference(mixed, same, "b", rng, rep.SUITE_TASKS["b"][1:])
    assert one["diff"] > 20 and one["ci95"][0] > 0  # 0.9 against 0.5 on 150 paired documents
    assert rest["diff"] == 0.0 and rest["ci95"] == [0.0, 0.0]
    avg = rep.difference(mixed, same, "b", rng)
    assert avg["diff"] == pytest.approx(one["diff"] / len(rep.SUITE_TASKS["b"]))


def test_report_end_to_end(bench, tmp_path):
    conv, rep = bench
    a = _args(conv, tmp_path, "--methods", "riemannion+loi,adamw", "--seeds", "2")
    for m in ("riemannion+loi", "adamw"):
        grid = conv.METHODS[m].grid
        for lr in grid:  # the second point is best
            _fake_run(tmp_path, conv.run_name(m, lr, 0), [3.0, 2.0, 1.5 + abs(lr - grid[1])])
        _fake_run(tmp_path, conv.run_name(m, grid[1], 1), [3.0, 1.8, 1.6])
        for s in (0, 1):
            good = 1 if m == "adamw" else 0
            base = {t: [0, 0, 0, 1] for t in rep.SUITE_TASKS["b"]} if good and not s else None
            _fake_eval(tmp_path / "runs" / conv.run_name(m, grid[1], s),
                       {t: [good, 1, 0, 1] for t in rep.SUITE_TASKS["b"]}, rep, base=base)
    assert conv.Protocol(a).pending() == []
    res = rep.report(a)
    adamw, riem = res["methods"]["adamw"], res["methods"]["riemannion+loi"]
    assert adamw["seeds"] == riem["seeds"] == 2
    assert adamw["acc_b"] == [75.0, 0.0] and riem["acc_b"] == [50.0, 0.0]
    assert adamw["answered_b"] == [75.0, 0.0] and "answered_b" in riem
    assert res["difference"]["b"]["diff"] == pytest.approx(-25.0)
    # every task differs by the same first document: -25 points in each
    assert [e["diff"] for e in res["difference_per_task"]["b"].values()] == pytest.approx(
        [-25.0] * len(rep.SUITE_TASKS["b"]))
    assert res["base"]["acc_b"] == 25.0 and res["base"]["answered_b"] == 75.0
    # AdamW reaches its own final loss exactly at its last evaluation; the same curve here.
    assert [x["ratio"] for x in riem["to_adamw_final"]] == [1.0, 1.0]
    assert [x["ratio"] for x in riem["to_adamw_90"]] == [1.0, 1.0]
    md = (tmp_path / "convergence.md").read_text()
    assert "strictly inside" in md and "−25.0" not in md and "-25.0 points" in md
    assert "Per task (same bootstrap, one task at a time): BoolQ -25.0 [" in md
    # the base model's row in protocol (b)'s per-task table: 25 % in every task
    assert "| base model (no adapter) | " + " | ".join(["25.0"] * 9) + " |" in md
    for png in ("loss_curves.png", "lr_grids.png", "accuracy.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_a_run_held_by_a_live_process_is_not_started_again(bench, tmp_path):
    conv, _ = bench
    a = _args(conv, tmp_path, "--methods", "adamw", "--seeds", "1", "--eval-limit", "0")
    proto = conv.Protocol(a)
    job = proto.pending()[0]
    run = tmp_path / "runs" / job.name
    run.mkdir(parents=True)
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; print(1, flush=True); "
                             "time.sleep(60)", "riemann_zero.train"],  # a stand-in training run
                            stdout=subprocess.PIPE, text=True)
    try:
        live.stdout.readline()  # started: its command line is readable from now on
        (run / "run.lock").write_text(json.dumps({"pid": live.pid, "host": host}))
        assert conv.busy(run) and not proto.startable(job)
    finally:
        live.kill()
        live.wait()
    assert not conv.busy(run) and proto.startable(job)  # a killed run's lock: resume it
    # a live process that is not a training run (a reused pid after a reboot): not busy
    (run / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": host}))
    assert not conv.busy(run)


def test_final_loss_is_the_mean_of_the_last_30_percent(bench, tmp_path):
    conv, _ = bench
    losses = [3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]  # steps 0, 10, ..., 100
    _fake_run(tmp_path, "r", losses)
    records = conv.Records(tmp_path)
    assert records.sync() == ["r.train"]
    mean = np.mean([0.5, 0.4, 0.3, 0.2])  # the evaluations at steps 70..100
    assert conv.final_eval_loss(records.train("r")) == pytest.approx(mean)


def test_records_carry_the_protocol_past_the_run_folders(bench, tmp_path):
    """A fresh clone has the records but no run folders: the grid, the chosen lr and the scored
    seeds come from the records; a run whose adapter is still to be scored is trained again,
    and its new run folder replaces its record."""
    conv, rep = bench
    a = _args(conv, tmp_path, "--methods", "adamw", "--seeds", "2")
    grid = conv.METHODS["adamw"].grid
    for lr in grid:  # the second point is best
        _fake_run(tmp_path, conv.run_name("adamw", lr, 0), [3.0, 2.0, 1.5 + abs(lr - grid[1])])
    best = grid[1]
    seed1 = _fake_run(tmp_path, conv.run_name("adamw", best, 1), [3.0, 1.8, 1.6])
    _fake_eval(seed1, {t: [1, 1, 0, 1] for t in rep.SUITE_TASKS["b"]}, rep)
    proto = conv.Protocol(a)
    assert _names(proto.pending()) == [f"eval:{conv.run_name('adamw', best, 0)}"]
    shutil.rmtree(tmp_path / "runs")  # the machine is gone; the records are in git
    fresh = conv.Protocol(a)
    assert fresh.best_lr("adamw") == best and fresh.evaluated(seed1.name)
    job = fresh.pending()
    assert _names(job) == [f"train:{conv.run_name('adamw', best, 0)}"]  # for its adapter
    assert rep.report(a)["methods"]["adamw"]["acc_b"] == [75.0, 0.0]  # seed 1's eval record
    # Trained again: a slightly different curve replaces the record, and the eval follows.
    again = _fake_run(tmp_path, job[0].name, [3.0, 2.0, 1.25])
    assert fresh.records.sync() == [f"{again.name}.train"]
    assert fresh.loss(again.name) == pytest.approx(1.25)
    assert _names(fresh.pending()) == [f"eval:{again.name}"]


def test_one_seed_shows_no_spread(bench):
    _, rep = bench
    # One seed has no std: "± 0.0000" would read as a perfectly repeatable result.
    assert rep._f([0.1655, 0.0], 4, n=1) == "0.1655"
    assert rep._f([0.1683, 0.0027], 4, n=3) == "0.1683 ± 0.0027"
    assert rep._speed([{"steps": None, "ratio": None}]) == "not reached (1 seed)"
