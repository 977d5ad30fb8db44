"""riemann_zero.hf.Trainer under FSDP2 through accelerate, 2 gloo processes, plain user script
(tests/hf/hf_worker.py) under ``torchrun`` with ``TrainingArguments(fsdp=True,
fsdp_config={"version": 2})``, and under ``accelerate launch --use_fsdp --fsdp_version 2`` alone:
the parameters really are DTensors with lora_A on ``Shard(1)`` (a silent DDP fallback fails
here), the run equals the one-process Trainer run, its adapter reproduces those logits in stock
PEFT in a process that never imports riemann_zero, and a run killed after a checkpoint resumes to
the uninterrupted run's losses and points.

Tolerances: RTOL = 1e-5 as in tests/distributed/test_engines.py. FSDP2 reduce-scatters the two
ranks' gradients (and LOI sums the two ranks' sketches) in another order than one process sums the
global batch: ~1e-7 relative in fp32 gradients, a few 1e-7 after four manifold steps (LOI's
randomized SVD of fp32 sketches ~1e-6). A lost row, a doubled step or a rank training on the
other's data moves X by ≥ 1e-2. The resumed run replays the same operations on the same ranks
from state read back bit-exactly: 1e-12.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from hf_worker import assert_resumed, launch, stock_peft_logits  # noqa: E402

RTOL = 1e-5
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
           PYTHONWARNINGS="ignore", PYTHONPATH=str(HERE.parents[1]))
pytestmark = pytest.mark.slow  # 1 one-process and 4 two-process Trainer runs (~3–4 min)
COMMON = dict(steps=4, loi=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_fsdp")
    # the same examples per step: 1 process × 4 = 2 ranks × 2 (LOI: 2 micro-batches each)
    ref = launch(tmp, "ref", 1, ENV, per_device=4, **COMMON)
    full = launch(tmp, "full", 2, ENV, per_device=2, fsdp=True, save_steps=2, **COMMON)
    assert launch(tmp, "cut", 2, ENV, expect=9, per_device=2, fsdp=True, save_steps=2,
                  kill_at=2, **COMMON) is None  # killed right after the step-2 checkpoint
    resumed = launch(tmp, "cut", 2, ENV, per_device=2, fsdp=True, save_steps=2,
                     resume=str(tmp / "cut" / "checkpoint-2"), **COMMON)
    # FSDP2 from the launcher alone (its environment; no fsdp= in TrainingArguments), with its
    # default cpu_ram_efficient_loading (accelerate refuses --cpu with --use_fsdp: the worker
    # asks for use_cpu=True itself)
    launched = launch(tmp, "accelerate", 2, ENV, per_device=2, **COMMON,
                      accelerate=("--use_fsdp", "--fsdp_version", "2"))
    return tmp, ref, full, resumed, launched


def _rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def test_fsdp2_two_processes_equal_one(runs):
    _, ref, full, _, launched = runs
    for got in (full, launched):
        assert got["world"] == 2 and got["engine"].startswith("FSDP")  # sharded, not DDP
        assert got["lora_A"] == ["(Shard(dim=1),)"]  # DTensors, the manifold placement
        assert _rel(got["points"], ref["points"]) <= RTOL
        assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL)
        assert all(h.get("comm/all_reduce.gram_m", 0) > 0 for h in got["logs"])


def test_fsdp2_adapter_reproduces_logits_in_stock_peft(runs, tmp_path):
    tmp, _, full, *_ = runs
    got, want, base = stock_peft_logits([tmp / "full" / "adapter", tmp / "ref" / "adapter", None],
                                        tmp_path / "logits.pt", ENV)
    trained = full["logits"]  # the trained model's, computed in the training processes
    assert (trained - base).abs().max() > 1e-4  # the adapter changes the logits
    assert (got - trained).abs().max() <= RTOL * trained.abs().max()
    assert (got - want).abs().max() <= RTOL * want.abs().max()


def test_fsdp2_resume_after_kill_continues_exactly(runs):
    tmp, _, full, resumed, _ = runs
    ckpt = tmp / "cut" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.glob("rz_optimizer_rank*.pt")) == [
        "rz_optimizer_rank0.pt", "rz_optimizer_rank1.pt"]
    assert resumed["steps"] == full["steps"] == [1, 2, 3, 4]
    assert resumed["losses"][2:] == pytest.approx(full["losses"][2:], rel=1e-12, abs=0)
    assert _rel(resumed["points"], full["points"]) <= 1e-12
    assert_resumed(full, resumed, at=2, total=4)
