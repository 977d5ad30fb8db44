"""A run that fails, fails loudly and loses nothing, through the real driver on the real 2-layer
SmolLM2 and real ARC-Easy data: divergence stops the run before anything non-finite is saved, a
non-finite or damaged checkpoint is refused or skipped at resume, a second run into a busy
output_dir is refused before loading, a failed start does not block the corrected rerun, and
checkpoints hold only what resuming needs, readable by other users."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from riemann_zero.train.checkpoint import list_checkpoints, verify_checkpoint
from riemann_zero.train.cli import DIVERGED_EXIT_CODE, STOP_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "smollm2_commonsense.yaml")
COMMON = ["model.name_or_path=asset:smollm2:2", "data.train=commonsense:ARC-Easy",
          "data.train_limit=32", "data.eval_limit=4", "data.max_length=64", "lora.r=4",
          "lora.target_modules=q_proj,v_proj", "train.micro_batch_size=2", "eval_after.suite=null",
          "init.p=4", "init.batches=1", "deepspeed.zero_optimization.stage=0"]
RIEMANNION = ["optimizer.name=riemannion", "init.method=loi"]
ADAMW = ["optimizer.name=adamw", "init.method=peft"]
MODEL_STATES = "mp_rank_00_model_states.pt"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "riemann_zero.train", RECIPE, *COMMON, f"output_dir={out}",
            *extra]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600, preexec_fn=lambda: os.umask(0o022))


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("riemann_zero.train:")]


def _losses(out: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {("eval" if "eval_loss" in r else "train", r["step"]): r.get("eval_loss", r.get("loss"))
            for r in rows}


def _adapter_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    module = torch.load(checkpoint / MODEL_STATES, weights_only=False)["module"]
    return {k: v for k, v in module.items() if "lora_" in k}


# AdamW at stage 0 first shows a NaN loss (its step is bounded by lr, the forward overflows);
# Riemannion's decoupled weight decay multiplies the factors by |1 − ηλ| ~ 3e5 per step, so they
# overflow while the loss, behind RMSNorms, is still finite: only the check of the trainable
# tensors sees it, at the step that produced them.
@pytest.mark.parametrize("name,opts,seen", [
    ("adamw_zero0", ADAMW, "non-finite loss"),
    ("riemannion_zero0", RIEMANNION, "non-finite values in"),
    pytest.param("riemannion_zero2", [*RIEMANNION, "deepspeed.zero_optimization.stage=2"],
                 "non-finite values in", marks=pytest.mark.slow)])
def test_divergence_stops_the_run_and_keeps_the_newest_finite_checkpoint(tmp_path, name, opts,
                                                                         seen):
    out = tmp_path / "run"
    proc = _train(out, *opts, "optimizer.lr=1e8", "schedule.type=constant", "max_steps=12",
                  "train.save_every=1", "train.keep_last=1")
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr[-3000:]
    (line,) = _error_lines(proc)  # one line, from rank 0
    # either way the step is named and nothing of it is saved
    assert "training diverged at step" in line
    assert seen in line, line
    assert "at lr 1e+08" in line and "Try a lower optimizer.lr" in line
    step = int(line.split("at step ")[1].split(":")[0])
    if seen == "non-finite values in":  # the loss never showed it: every logged one is finite
        losses = _losses(out)
        assert all(math.isfinite(v) for v in losses.values()), losses
        assert max(k for kind, k in losses if kind == "train") == step - 1
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "diverged" and "diverged at step" in run["error"]
    assert not (out / "adapter").exists()  # nothing non-finite was exported
    kept = list_checkpoints(out / "checkpoints")
    if step == 1:
        assert kept == []
    else:  # keep_last=1: rotation kept the last finite checkpoint, the step before divergence
        assert [p.name for p in kept] == [f"step-{step - 1:08d}"]
        assert verify_checkpoint(kept[0]) is None
        tensors = _adapter_tensors(kept[0])
        assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert not (out / "run.lock").exists()


def _rewrite_manifest(checkpoint: Path) -> None:
    """Record the files' current sizes and digests (a checkpoint that passes integrity checks,
    as one written by an older version or damaged before it was recorded would)."""
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    for rel, rec in marker["files"].items():
        data = (checkpoint / rel).read_bytes()
        rec.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def test_non_finite_checkpoint_is_refused_at_resume_naming_the_earlier_one(tmp_path):
    out = tmp_path / "run"
    first = _train(out, *ADAMW, "optimizer.lr=1e-3", "max_steps=6", "train.save_every=2",
                   "stop_after=4")
    assert first.returncode == STOP_EXIT_CODE, first.stderr[-3000:]
    newest = out / "checkpoints" / "step-00000004"
    states = torch.load(newest / MODEL_STATES, weights_only=False)
    name = next(k for k in states["module"] if "lora_A" in k)
    states["module"][name][0, 0] = float("nan")
    torch.save(states, newest / MODEL_STATES)
    _rewrite_manifest(newest)
    second = _train(out, *ADAMW, "optimizer.lr=1e-3", "max_steps=6", "train.save_every=2")
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = _error_lines(second)
    assert f"checkpoint {newest} holds non-finite values in 1 trainable tensors" in line
    assert f"resume={out / 'checkpoints' / 'step-00000002'}" in line


@pytest.mark.slow
def test_truncated_checkpoint_is_named_and_resume_falls_back_exactly(tmp_path):
    opts = [*RIEMANNION, "optimizer.lr=1e-3", "max_steps=6", "train.save_every=2",
            "train.eval_every=2", "lora.lora_dropout=0.1"]
    full = _train(tmp_path / "full", *opts)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = tmp_path / "cut"
    first = _train(cut, *opts, "stop_after=5")  # checkpoints at 2 and 4
    assert first.returncode == STOP_EXIT_CODE, first.stderr[-3000:]
    damaged = cut / "checkpoints" / "step-00000004" / MODEL_STATES
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    second = _train(cut, *opts)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"skipping damaged checkpoint step-00000004: {damaged} has" in second.stdout
    assert "resuming from step-00000002, the newest intact checkpoint" in second.stdout
    assert "resumed from" in second.stdout
    expected, got = _losses(tmp_path / "full"), _losses(cut)
    assert sorted(got) == sorted(expected)
    # Same process layout and thread count, so the arithmetic is bit-identical: compare exactly.
    for key in sorted(expected):
        assert got[key] == expected[key], f"{key}: resumed {got[key]} vs full {expected[key]}"


def test_checkpoints_hold_only_what_resuming_needs_and_are_readable(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, *RIEMANNION, "optimizer.lr=1e-3", "max_steps=2", "train.save_every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = list_checkpoints(out / "checkpoints")[-1]
    keys = torch.load(newest / MODEL_STATES, weights_only=False)["module"].keys()
    assert not any(k.endswith("lm_head.weight") for k in keys)  # the frozen, tied embedding
    # Before: the tied lm_head alone was written, vocab 49152 x hidden 576 in fp32 = 113 MB.
    frozen_lm_head = 49152 * 576 * 4
    size = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    assert size * 10 < frozen_lm_head, size
    assert f"checkpoint {newest.name}: " in proc.stdout and "MiB in" in proc.stdout
    # Written with the umask (0022 here), so a serving process of another user can read them.
    for path in [out / "adapter", *(out / "adapter").iterdir(), newest, *newest.iterdir()]:
        want = 0o755 if path.is_dir() else 0o644
        assert (path.stat().st_mode & 0o777) == want, (path, oct(path.stat().st_mode))
    assert not (out / "checkpoints" / ".tmp").exists() and not (out / "run.lock").exists()
    # The adapter names its base as the recipe did (portable); run.json has this machine's copy.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "asset:smollm2:2"
    assert Path(json.loads((out / "run.json").read_text())["model_path"]).is_dir()


def test_second_run_into_a_busy_output_dir_is_refused_before_loading(tmp_path):
    out = tmp_path / "run"
    opts = [*ADAMW, "optimizer.lr=1e-3", "max_steps=400", "data.train_limit=1600"]
    first = subprocess.Popen(_cmd(out, *opts), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "run.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "first run never started"
            time.sleep(0.2)
        second = _train(out, *opts)
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = _error_lines(second)
        assert f"is in use by another run (pid {first.pid} on host" in line
        assert "Loading weights" not in second.stderr + second.stdout
        assert "data ready" not in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed run left its lock behind: the next run says so, takes over and trains.
    third = _train(out, *opts[:-2], "max_steps=1", "data.train_limit=32")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"removed a stale lock of pid {first.pid}" in third.stdout


def test_failed_start_does_not_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "run"
    bad = _train(out, *ADAMW, "data.train_limit=1", "max_steps=2")  # no full batch of 2
    assert bad.returncode != 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "make no full optimizer step" in run["error"]
    good = _train(out, *ADAMW, "max_steps=2")
    assert good.returncode == 0, good.stderr[-3000:]
    assert "stopped before its first checkpoint (status 'failed'); replacing it" in good.stdout
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_skipping_overflow_steps_is_opt_in_and_limited(tmp_path):
    # AdamW at lr 1e8 under ZeRO-2: from some step on the loss is NaN and DeepSpeed's overflow
    # check skips the update (the factors stay finite). With 3 skips allowed the run goes on for
    # three such steps, marks them in metrics.jsonl, and stops at the fourth.
    out = tmp_path / "run"
    proc = _train(out, *ADAMW, "deepspeed.zero_optimization.stage=2", "optimizer.lr=1e8",
                  "schedule.type=constant", "max_steps=12", "train.skip_nonfinite_steps=3")
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr[-3000:]
    skipped = [ln for ln in proc.stdout.splitlines() if "the engine skipped the update" in ln]
    assert [ln.split("(")[-1] for ln in skipped] == [f"{k} of 3 allowed)" for k in (1, 2, 3)]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(bool(r.get("skipped")) for r in rows) == 3
    (line,) = _error_lines(proc)
    last = max(r["step"] for r in rows)
    assert f"training diverged at step {last + 1}: non-finite loss" in line
