"""TensorBoard mirrors metrics.jsonl: event files under output_dir/tensorboard/ (rank 0), read
back with tensorboard's own event reader, hold every numeric field at its step; a resumed run
drops the events after its checkpoint; ``logging.tensorboard=false`` writes none.

Tolerance: TensorBoard stores scalars as float32, so each value equals the JSON float64 to
float32 rounding (relative 2⁻²⁴ ≈ 6e-8; 1e-6 allows for values near zero of the comm counters,
which are integers and exact).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from riemann_zero.train.tracking import Trackers

REPO = Path(__file__).resolve().parents[2]


def _events(directory: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


# The TensorBoard tags, listed literally (not derived with the writer's own filter): every
# numeric field of a record but ``step``; flags (``skipped``), text and lists (``peak_rss_mib``)
# stay out. A driver run on one process, ZeRO-0, Riemannion: its training and eval records.
DRIVER_TAGS = {"loss", "lr", "tokens", "tokens_per_s", "step_time_s", "optim_time_s", "epoch",
               "manifold/orth_err_U", "manifold/orth_err_V", "manifold/max_norm_Z",
               "manifold/mean_norm_X", "eval_loss"}


def _expected(records: list[dict], tags: set[str]) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the records' fields named in ``tags``."""
    want: dict[str, dict[int, float]] = {}
    for rec in records:
        for key in tags & set(rec):
            want.setdefault(key, {})[rec["step"]] = float(rec[key])
    return want


def _assert_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for tag, by_step in want.items():
        assert set(got[tag]) == set(by_step), tag
        for step, value in by_step.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


def test_trackers_write_scalars_and_purge_on_resume(tmp_path):
    cfg = SimpleNamespace(tensorboard=True, wandb=False)
    recs = [{"step": s, "loss": 2.0 / s, "lr": 1e-3 * s, "comm/all_reduce.gram_m": 960 * s,
             "skipped": True, "note": "text"} for s in range(1, 5)]
    tr = Trackers(cfg, tmp_path, rank=0)
    for rec in recs:
        tr.write(rec)
    tr.close()
    tags = {"loss", "lr", "comm/all_reduce.gram_m"}  # not the flag "skipped", not the text
    _assert_equal(_events(tmp_path / "tensorboard"), _expected(recs, tags))
    # resume from step 2: steps 3, 4 are written again with other values; the old ones go
    again = [{**r, "loss": 9.0 + r["step"]} for r in recs[2:]]
    tr = Trackers(cfg, tmp_path, rank=0, start=2)
    for rec in again:
        tr.write(rec)
    tr.close()
    _assert_equal(_events(tmp_path / "tensorboard"), _expected(recs[:2] + again, tags))
    off = Trackers(SimpleNamespace(tensorboard=False, wandb=False), tmp_path / "off", rank=0)
    off.write(recs[0])
    off.close()
    assert not (tmp_path / "off").exists()
    Trackers(cfg, tmp_path / "r1", rank=1).write(recs[0])  # not rank 0: nothing written
    assert not (tmp_path / "r1").exists()


class _StubRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def log(self, values: dict, step: int) -> None:
        self.calls.append(("log", values, step))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_wandb_mirrors_metrics_through_its_api(tmp_path, monkeypatch):
    """Default-suite check of the W&B path without the package (or an account): a stub ``wandb``
    module in sys.modules records what Trackers calls. One offline run per output_dir, resumable
    under a stable id; each record's numeric fields at its step (flags and text out); finish on
    close; nothing on ranks other than 0. The real package runs in the slow test below."""
    import types

    calls: list = []
    stub = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _StubRun(calls)

    stub.init = init
    monkeypatch.setitem(sys.modules, "wandb", stub)
    cfg = SimpleNamespace(tensorboard=False, wandb=True, wandb_project="t", wandb_mode="offline")
    tr = Trackers(cfg, tmp_path / "a", rank=0, config={"a": 1})
    tr.write({"step": 1, "loss": 1.5, "skipped": True, "comm/all_reduce.gram_m": 960,
              "note": "text", "peak_rss_mib": [800.0]})
    tr.write({"step": 1, "eval_loss": 1.75})
    tr.write({"step": 2, "loss": 1.25})
    tr.close()
    (kind, kwargs), *rest = calls
    assert kind == "init"
    run_id = kwargs.pop("id")
    assert kwargs == {"project": "t", "dir": str(tmp_path / "a"), "config": {"a": 1},
                      "mode": "offline", "resume": "allow"}
    assert rest == [("log", {"loss": 1.5, "comm/all_reduce.gram_m": 960.0}, 1),
                    ("log", {"eval_loss": 1.75}, 1), ("log", {"loss": 1.25}, 2), ("finish",)]
    calls.clear()
    Trackers(cfg, tmp_path / "a", rank=0, start=2).close()  # a resumed run: the same W&B run
    Trackers(cfg, tmp_path / "b", rank=0).close()  # another output_dir: another run
    ids = [c[1]["id"] for c in calls if c[0] == "init"]
    assert ids[0] == run_id and ids[1] != run_id and len(run_id) >= 8
    calls.clear()
    Trackers(cfg, tmp_path / "c", rank=1).write({"step": 1, "loss": 1.0})
    assert calls == []


@pytest.mark.slow
def test_wandb_offline_mirrors_metrics(tmp_path):
    """The real wandb package, offline (``make test-slow``; pip install 'riemann-zero[wandb]')."""
    pytest.importorskip("wandb")
    cfg = SimpleNamespace(tensorboard=False, wandb=True, wandb_project="t", wandb_mode="offline")
    tr = Trackers(cfg, tmp_path, rank=0, config={"a": 1})
    tr.write({"step": 1, "loss": 1.5, "skipped": True, "comm/all_reduce.gram_m": 960})
    tr.write({"step": 1, "eval_loss": 1.75})  # the driver's eval record at a train step
    tr.write({"step": 2, "loss": 1.25})
    run = tr.wandb
    # W&B commits a step's row when a later step is logged: step 1, both records merged
    assert run.summary["loss"] == 1.5 and run.summary["eval_loss"] == 1.75
    assert run.summary["comm/all_reduce.gram_m"] == 960
    assert "skipped" not in list(run.summary.keys()) and run.config["a"] == 1  # no `in` on Summary
    tr.close()
    assert list(tmp_path.glob(f"wandb/offline-run-*-{run.id}/run-{run.id}.wandb"))


def test_driver_run_event_files_equal_metrics_jsonl(tmp_path):
    """A real driver run (4-layer SmolLM2, commonsense data, 4 steps, eval every 2; ~20 s)."""
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "riemann_zero.train", str(REPO / "recipes/smollm2_commonsense.yaml"),
         "model.name_or_path=asset:smollm2:4", "data.train=commonsense:ARC-Easy",
         "data.train_limit=32", "data.eval_limit=4", "data.max_length=64", "lora.r=2",
         "lora.target_modules=q_proj,v_proj", "train.micro_batch_size=2",
         "train.gradient_accumulation_steps=1", "max_steps=4", "train.eval_every=2",
         "init.batches=1", "init.p=4", "init.q=0", "deepspeed.zero_optimization.stage=0",
         "eval_after.suite=null", f"output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = _events(out / "tensorboard")
    assert set(got) == DRIVER_TAGS
    _assert_equal(got, _expected(records, DRIVER_TAGS))
