"""riemann_zero.hf.Trainer under the Trainer's own DeepSpeed integration
(``TrainingArguments(deepspeed=...)``), ZeRO-2 and ZeRO-3 on 2 gloo processes, equals the
one-process Trainer run, with and without LOI, and with gradient accumulation (ZeRO-2, 2
micro-batches); the adapter it saves reproduces those logits in stock PEFT in a process that never
imports riemann_zero; a ZeRO-2 run killed after a Trainer checkpoint resumes to the uninterrupted
run's losses and points. The worker is a plain user script under ``torchrun --nproc-per-node 2``
(no pre-configured accelerate state): each run asserts that the Trainer saw both processes.

Tolerance: that of tests/distributed/test_engines.py (RTOL = 1e-5): ZeRO averages the two ranks'
gradients (and LOI sums the two ranks' sketches) in another order than one process sums the
global batch, which changes fp32 gradients by ~1e-7 relative; four smooth manifold steps keep that
at a few 1e-7 (LOI: its randomized SVD of fp32 sketches, ~1e-6). A lost row, a doubled step or a
rank training on the other's data moves X by ≥ 1e-2 relative. Resume: the same operations on the
same ranks from DeepSpeed's checkpoint (fp32 partitions and the manifold optimizer's state, read
back bit-exactly): 1e-12.
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
pytestmark = pytest.mark.slow  # 9 Trainer runs, 7 of them 2-process (~6–8 min on 2 cores)


def _run(tmp: Path, name: str, world: int, **spec) -> dict:
    return launch(tmp, name, world, ENV, steps=4, **spec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_ds")
    res = {}
    for loi in (False, True):
        # the same examples per step: 1 × 4 = 2 ranks × 2; LOI: 2 micro-batches of 4 = 2 ranks
        # × 2 micro-batches of 2 (each rank sketches its own, the sums are reduced)
        res["ref", loi] = _run(tmp, f"ref_loi{int(loi)}", 1, per_device=4, loi=loi)
        for stage in (2, 3):
            res[stage, loi] = _run(tmp, f"z{stage}_loi{int(loi)}", 2, per_device=2, loi=loi,
                                   stage=stage)
    # 2 ranks × 2 accumulated micro-batches of 1 = the same 4 examples per optimizer step
    res["accum"] = _run(tmp, "z2_accum", 2, per_device=1, accum=2, loi=False, stage=2)
    # killed right after the step-2 checkpoint, then resumed from it (uninterrupted: z2_loi1)
    cut = dict(per_device=2, loi=True, stage=2, save_steps=2)
    assert launch(tmp, "z2_cut", 2, ENV, expect=9, steps=4, kill_at=2, **cut) is None
    res["resumed"] = _run(tmp, "z2_cut", 2, resume=str(tmp / "z2_cut" / "checkpoint-2"), **cut)
    return tmp, res


def _rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("loi", [False, True])
def test_zero_two_processes_equal_one(runs, stage, loi):
    _, res = runs
    ref, got = res["ref", loi], res[stage, loi]
    assert got["world"] == 2 and got["engine"] == "DeepSpeedEngine"  # not one rank alone
    assert _rel(got["points"], ref["points"]) <= RTOL
    assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL)
    assert all(h.get("comm/all_reduce.gram_m", 0) > 0 for h in got["logs"])  # bytes are logged


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("loi", [False, True])
def test_zero_adapter_reproduces_logits_in_stock_peft(runs, stage, loi, tmp_path):
    from safetensors.torch import load_file

    tmp, _ = runs
    saved = tmp / f"z{stage}_loi{int(loi)}" / "adapter"
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    assert tensors and all(t.numel() and t.abs().max() > 0 for t in tensors.values())
    dist, ref, base = stock_peft_logits(
        [saved, tmp / f"ref_loi{int(loi)}" / "adapter", None], tmp_path / "logits.pt", ENV)
    # against the trained model itself (its logits computed in the training processes), not
    # only against another export from the same writer
    trained = runs[1][stage, loi]["logits"]
    assert (trained - base).abs().max() > 1e-4  # the adapter changes the logits
    assert (dist - trained).abs().max() <= RTOL * trained.abs().max()
    assert (dist - ref).abs().max() <= RTOL * ref.abs().max()


def test_zero2_gradient_accumulation_equals_one_process(runs):
    _, res = runs
    ref, got = res["ref", False], res["accum"]
    assert got["world"] == 2
    assert _rel(got["points"], ref["points"]) <= RTOL
    assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL)


def test_zero2_resume_after_kill_continues_exactly(runs):
    tmp, res = runs
    full, resumed = res[2, True], res["resumed"]
    assert (tmp / "z2_cut" / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert resumed["steps"] == full["steps"] == [1, 2, 3, 4]
    assert resumed["losses"][2:] == pytest.approx(full["losses"][2:], rel=1e-12, abs=0)
    assert _rel(resumed["points"], full["points"]) <= 1e-12
    assert_resumed(full, resumed, at=2, total=4)
