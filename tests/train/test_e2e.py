"""End to end through DeepSpeed's launcher: 2 CPU processes, ZeRO-2, Riemannion + LOI on the real
(4-layer) SmolLM2 and real commonsense data; the loss goes down and the adapter is stock PEFT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from stock_peft import assert_adapter_is_the_trained_model

REPO = Path(__file__).resolve().parents[2]
EVAL = {"dataset": "commonsense:ARC-Easy", "limit": 16, "max_length": 96}


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_deepspeed_launcher_zero2_two_processes(tmp_path):
    launcher = shutil.which("deepspeed", path=_env()["PATH"])
    assert launcher, "the deepspeed launcher is not on PATH"
    out = tmp_path / "run"
    cmd = [launcher, "--num_gpus", "2", "launch/run.sh", "recipes/smollm2_commonsense.yaml",
           "model.name_or_path=asset:smollm2:4", f"output_dir={out}", "max_steps=16",
           f"data.train={EVAL['dataset']}", "data.train_limit=256",
           f"data.eval_limit={EVAL['limit']}", f"data.max_length={EVAL['max_length']}",
           "train.eval_every=8", "train.save_every=8", "init.p=4", "init.batches=1",
           "optimizer.lr=1e-3", "eval_after.suite=null"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["world_size"] == 2
    assert run["recipe"]["deepspeed"]["zero_optimization"]["stage"] == 2
    assert run["recipe"]["optimizer"]["name"] == "riemannion"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(train) == 16 and len(evals) == 3  # steps 0, 8 and 16
    assert all("manifold/orth_err_U" in r for r in rows if "loss" in r)
    # the optimizer's own bytes per step: under ZeRO-2 the Grams of both sides and the exchange
    # of flat fragments into row blocks (no gather of the n side any more)
    assert all(r["comm/all_reduce.gram_m"] > 0 and r["comm/all_reduce.gram_n"] > 0
               and r["comm/all_to_all.exchange"] > 0 and "comm/all_reduce.gather_n" not in r
               for r in rows if "loss" in r)
    # Loss decreases: held-out eval loss (no dropout, fixed set) at the end below the start, and
    # the last four training losses below the first four (single batches are noisy).
    assert evals[-1] < evals[0] - 0.1, evals
    assert sum(train[-4:]) < sum(train[:4]), train

    # The adapter loads in stock PEFT, in a process that never imports riemann_zero, and gives
    # the driver's final eval loss on the original base model.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "asset:smollm2:4"  # portable, as the recipe says
    assert_adapter_is_the_trained_model(out, EVAL["dataset"], EVAL["limit"], EVAL["max_length"],
                                        tmp_path)
