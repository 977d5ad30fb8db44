"""Kill a run right after a checkpoint, resume=auto: the loss trajectory equals an uninterrupted
run's exactly (model state with LOI buffers, optimizer, scheduler, RNG streams, data position), and
the run really resumed (tests/train/resume_probe.py: no forward pass of the steps before the
checkpoint, metrics.jsonl continued after it), which equal losses alone cannot show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from resume_probe import assert_resumed, probe_env, tag_metrics

from riemann_zero.train.cli import STOP_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "smollm2_commonsense.yaml")

# 4-layer real SmolLM2, real ARC-Easy data; dropout on so the RNG state matters.
COMMON = ["model.name_or_path=asset:smollm2:4", "data.train=commonsense:ARC-Easy",
          "data.train_limit=48", "data.eval_limit=4", "data.max_length=64", "lora.r=4",
          "lora.lora_dropout=0.1", "lora.target_modules=q_proj,v_proj",
          "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
          "train.save_every=3", "train.eval_every=3", "max_steps=6",
          "schedule.warmup_steps=2", "deepspeed.zero_optimization.stage=0",
          "eval_after.suite=null"]
VARIANTS = {
    "riemannion_loi": ["optimizer.name=riemannion", "optimizer.lr=1e-3", "init.method=loi",
                       "init.p=4", "init.batches=1"],
    "adamw": ["optimizer.name=adamw", "optimizer.lr=1e-3", "init.method=peft"],
    # LoRA-GA moves the base weight from calibration gradients: a resumed run must rebuild the
    # same moved base (seeded randomized SVD) and still export an adapter on the original base.
    "adamw_lora_ga": ["optimizer.name=adamw", "optimizer.lr=1e-3", "init.method=lora_ga",
                      "init.batches=1"],
    # StelLA keeps fp32 U, S, V masters in its state and rewrites lora_A/lora_B from them.
    "stella": ["optimizer.name=stella", "optimizer.lr=1e-3", "init.method=peft"],
    # ZeRO-3 partitions the adapters even with one process: the optimizer reads and writes its
    # fp32 partitions and DeepSpeed's checkpoint carries the per-adapter state.
    "riemannion_loi_zero3": ["optimizer.name=riemannion", "optimizer.lr=1e-3", "init.method=loi",
                             "init.p=4", "init.batches=1", "deepspeed.zero_optimization.stage=3"],
}


def _train(out: Path, *extra: str, log: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if log is not None:
        env = probe_env(env, log)
    return subprocess.run([sys.executable, "-m", "riemann_zero.train", RECIPE, *COMMON,
                           f"output_dir={out}", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def _losses(out: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {("eval" if "eval_loss" in r else "train", r["step"]): r.get("eval_loss", r.get("loss"))
            for r in rows}


# The default suite keeps the manifold optimizer (with LOI, with and without ZeRO-3) and the
# AdamW baseline; LoRA-GA's moved base and StelLA's masters (about 2 minutes each on 2 cores) run
# in `make test-slow`, so that the default suite stays under 20 minutes.
SLOW_VARIANTS = ("adamw_lora_ga", "stella")


@pytest.mark.parametrize("variant", [
    pytest.param(v, marks=pytest.mark.slow) if v in SLOW_VARIANTS else v for v in VARIANTS])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, variant):
    opts = VARIANTS[variant]
    full = _train(tmp_path / "full", *opts, log=tmp_path / "full.forwards")
    assert full.returncode == 0, full.stderr[-3000:]

    cut = tmp_path / "cut"
    first = _train(cut, *opts, "stop_after=4")  # dies after step 4: the last checkpoint is 3
    assert first.returncode == STOP_EXIT_CODE, first.stderr[-3000:]
    assert not (cut / "adapter").exists()
    assert [p.name for p in (cut / "checkpoints").glob("step-*")] == ["step-00000003"]
    tag_metrics(cut)
    second = _train(cut, *opts, log=tmp_path / "resumed.forwards")  # resume=auto, the default
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    # micro-batches of 2, gradient accumulation 2: two forward passes per step
    assert_resumed(tmp_path / "full.forwards", tmp_path / "resumed.forwards", cut, at=3, total=6,
                   micro_per_step=2)

    expected, got = _losses(tmp_path / "full"), _losses(cut)
    assert sorted(got) == sorted(expected)
    # Same process layout and thread count, so the arithmetic is bit-identical: compare exactly.
    for key in sorted(expected):
        assert got[key] == expected[key], f"{key}: resumed {got[key]} vs full {expected[key]}"
    run = json.loads((cut / "run.json").read_text())
    assert run["status"] == "finished" and run["steps"] == 6
    assert (cut / "adapter" / "adapter_model.safetensors").is_file()


def _launch(out: Path, stage: int, *extra: str, log: Path | None = None,
            model: str = "asset:smollm2:4") -> subprocess.CompletedProcess:
    """2 processes through DeepSpeed's launcher (as `deepspeed --num_gpus 2 launch/run.sh`)."""
    import shutil

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if log is not None:
        env = probe_env(env, log)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = shutil.which("deepspeed", path=env["PATH"])
    opts = [o for o in COMMON
            if not o.startswith(("deepspeed.zero_optimization.stage", "model.name_or_path"))]
    cmd = [launcher, "--num_gpus", "2", "launch/run.sh", RECIPE, *opts,
           f"model.name_or_path={model}", *VARIANTS["riemannion_loi"],
           f"deepspeed.zero_optimization.stage={stage}",
           "train.micro_batch_size=1", f"output_dir={out}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def _two_process_resume(tmp_path: Path, stage: int, model: str) -> None:
    full = _launch(tmp_path / "full", stage, log=tmp_path / "full.forwards", model=model)
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    cut = tmp_path / "cut"
    first = _launch(cut, stage, "stop_after=4", model=model)
    assert first.returncode != 0  # stopped on purpose after the step-3 checkpoint
    tag_metrics(cut)
    second = _launch(cut, stage, log=tmp_path / "resumed.forwards", model=model)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    expected, got = _losses(tmp_path / "full"), _losses(cut)
    assert sorted(got) == sorted(expected)
    for key in sorted(expected):  # same layout and threads: bit-identical arithmetic
        assert got[key] == expected[key], f"{key}: resumed {got[key]} vs full {expected[key]}"
    # micro-batches of 1, gradient accumulation 2, on each of the 2 ranks
    assert_resumed(tmp_path / "full.forwards", tmp_path / "resumed.forwards", cut, at=3, total=6,
                   micro_per_step=2, ranks=2)


def test_two_process_resume_on_the_two_layer_model(tmp_path):
    """The README's multi-process resume, in the default suite: DeepSpeed's launcher, 2 CPU
    processes, ZeRO-2, the 2-layer SmolLM2 cut; each rank resumes its own partition and data
    position (see the slow test below for ZeRO-2/3 on the 4-layer cut)."""
    _two_process_resume(tmp_path, 2, "asset:smollm2:2")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_resume_matches_uninterrupted_run(tmp_path, stage):
    """Each rank's optimizer partition (with this rank's rows of the Riemannion momentum) goes
    through DeepSpeed's checkpoint and comes back: the resumed run is the uninterrupted run."""
    _two_process_resume(tmp_path, stage, "asset:smollm2:4")
