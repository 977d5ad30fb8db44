"""What the README tells a new user to run, run in the default suite on the 2-layer SmolLM2 cut:
the ``smoke=true`` check, the driver's eval stage (what ``make demo`` ends with) and the stock
lm-eval CLI on the adapter the driver exported, and every example script at one step.
(The Trainer under ZeRO-1 on one process is in tests/hf/test_hf_trainer.py, the 2-process driver
resume in tests/train/test_resume.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "smollm2_commonsense.yaml")
EVAL_TASK = "rz_ll_piqa"  # lm-eval log-likelihood PIQA in this package's chat format


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _driver(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "riemann_zero.train", RECIPE, *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_trains_five_steps_and_exports(tmp_path):
    """README: ``python -m riemann_zero.train recipes/smollm2_commonsense.yaml smoke=true``: the
    2-layer cut, 5 steps, no checkpoints, no eval stage, a stock PEFT adapter."""
    out = tmp_path / "smoke"
    proc = _driver("smoke=true", f"output_dir={out}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["steps"] == 5
    assert run["recipe"]["model"]["name_or_path"] == "asset:smollm2:2"
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2, 3, 4, 5]
    assert not list(out.glob("checkpoints/step-*"))
    assert not (out / "eval").exists()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_driver_eval_stage_and_stock_lm_eval_cli_on_the_exported_adapter(tmp_path):
    """``make demo`` in small: training, then the driver's eval stage (base and adapter through
    lm-eval, results.json); then the stock ``lm_eval`` CLI with ``peft=`` on the adapter the driver
    exported after LOI (relative to the original base) gives the eval stage's numbers, and the
    adapter moved the log-likelihoods away from the base model's."""
    out = tmp_path / "demo"
    proc = _driver("model.name_or_path=asset:smollm2:2", "data.train=commonsense:ARC-Easy",
                   "data.train_limit=16", "data.eval_limit=2", "data.max_length=64", "lora.r=4",
                   "lora.target_modules=q_proj,v_proj", "train.micro_batch_size=2",
                   "train.gradient_accumulation_steps=1", "max_steps=2", "train.save_every=0",
                   "train.eval_every=0", "init.p=4", "init.batches=1", "optimizer.lr=1e-2",
                   "deepspeed.zero_optimization.stage=0", "eval_after.suite=commonsense",
                   "eval_after.limit=4", f"eval_after.tasks={EVAL_TASK}", f"output_dir={out}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((out / "eval" / "results.json").read_text())
    models = results["suites"]["commonsense"]["models"]
    assert len(models) == 2 and "base" in models
    (label,) = set(models) - {"base"}
    ours = models[label]["results"][EVAL_TASK]
    assert 0.0 <= ours["acc,none"] <= 1.0

    base = json.loads((out / "run.json").read_text())["model_path"]
    cli = Path(sys.executable).with_name("lm_eval")
    cmd = [str(cli), "--model", "hf",
           "--model_args", f"pretrained={base},peft={out / 'adapter'},dtype=float32",
           "--tasks", EVAL_TASK, "--include_path", "eval/tasks", "--limit", "4",
           "--device", "cpu", "--batch_size", "8", "--log_samples",
           "--output_path", str(tmp_path / "cli")]
    stock = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert stock.returncode == 0, stock.stderr[-3000:]
    got = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert got[EVAL_TASK][metric] == ours[metric], metric
    # the stock CLI's per-choice log-likelihoods with the adapter differ from the base model's
    # (the eval stage's own samples of the base)
    stock_ll = [json.loads(x)["resps"] for x in next(
        (tmp_path / "cli").rglob(f"samples_{EVAL_TASK}_*.jsonl")).read_text().splitlines()]
    base_ll = [json.loads(x)["resps"] for x in
               (out / "eval" / "samples_commonsense_base.jsonl").read_text().splitlines()
               if json.loads(x)["task"] == EVAL_TASK]
    assert len(stock_ll) == len(base_ll) == 4
    assert all(json.dumps(s) != json.dumps(b) for s, b in zip(stock_ll, base_ll))


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "examples").glob("*.py")))
def test_example_script_runs_one_step(tmp_path, script):
    """Each examples/*.py as its docstring shows it, at one step on the 2-layer cut: it trains,
    evaluates and saves a stock PEFT adapter."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--max-steps", "1",
                           "--layers", "2", "--output-dir", str(out)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "trained on 1 process(es)" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
