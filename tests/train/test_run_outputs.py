"""What a run leaves behind, through the real driver on the 2-layer SmolLM2: a run stopped by
``stop_after`` says so in run.json (not ``running``), a ZeRO checkpoint leaves no staging folder
behind (DeepSpeed copies its recovery scripts beside the checkpoint), and the stage line names
what is trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from riemann_zero.train.cli import STOP_EXIT_CODE
from riemann_zero.train.loop import _what_trains

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "smollm2_commonsense_adamw.yaml")
TINY = ["model.name_or_path=asset:smollm2:2", "data.train=commonsense:ARC-Easy",
        "data.train_limit=16", "data.eval_limit=4", "data.max_length=48", "lora.r=2",
        "lora.target_modules=q_proj", "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.global_batch_size=null", "max_steps=3",
        "train.save_every=1", "train.eval_every=0", "eval_after=null",
        "deepspeed.zero_optimization.stage=2"]


def test_stopped_zero2_run_is_marked_stopped_and_leaves_no_staging(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "riemann_zero.train", RECIPE, *TINY,
                           f"output_dir={out}", "stop_after=2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == STOP_EXIT_CODE, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert (run["status"], run["stopped_after"]) == ("stopped", 2)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001", "step-00000002"]
    assert "with LoRA r=2 and peft init" in proc.stdout + proc.stderr


def test_stage_line_names_what_trains():
    recipe = SimpleNamespace(lora=SimpleNamespace(r=16), init=SimpleNamespace(method="loi"),
                             adapter=SimpleNamespace(type="lora"))
    assert _what_trains(recipe, SimpleNamespace(trainable={})) == "with LoRA r=16 and loi init"
    full = SimpleNamespace(trainable={"model.layers.0.mlp.experts": (4, 8, 16)})
    assert _what_trains(recipe, full) == "training 1 whole parameters (no adapter)"
    assert "LoRA" not in _what_trains(recipe, full)
    recipe.adapter.type, recipe.init.method = "oft", "peft"
    assert _what_trains(recipe, SimpleNamespace(trainable={})) == (
        "with OFT adapters and peft init")
