"""bf16 under DeepSpeed: a manifold optimizer must actually move the model.

At ZeRO-0, DeepSpeed's bf16 wrapper steps fp32 copies of the params and copies them back over
the model, so Riemannion (which steps the adapters themselves) trained nothing and the held-out
loss stayed flat to the last digit; preflight now refuses that combination
(tests/train/test_registry.py). Under ZeRO-1 the fp32 master the optimizer writes is what the
engine copies back: the loss must fall as it does in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "smollm2_commonsense.yaml")


def _eval_losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_riemannion_bf16_zero1_trains(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "riemann_zero.train", RECIPE, "model.name_or_path=asset:smollm2:4",
         "max_steps=8", "train.micro_batch_size=4", "data.max_length=96", "data.train_limit=64",
         "data.eval_limit=8", "train.eval_every=4", "train.save_every=0", "init.batches=1",
         "optimizer.lr=3e-3", "eval_after.suite=null", "deepspeed.bf16.enabled=true",
         "deepspeed.zero_optimization.stage=1", f"output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    first, middle, last = _eval_losses(out)
    # The truncated 4-layer model starts near loss 20; fp32 reaches ~16 in 8 such steps and the
    # broken ZeRO-0 path moved it by < 0.01. A drop of 1 nat separates the two with room.
    assert first - last > 1.0 and middle != last, (first, middle, last)
