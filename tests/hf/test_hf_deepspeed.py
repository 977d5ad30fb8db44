"""riemann_zero.hf.Trainer under the Trainer's own DeepSpeed integration
(``TrainingArguments(deepspeed=...)``), ZeRO-2 and ZeRO-3 on 2 gloo processes, equals the
one-process Trainer run, with and without LOI; the adapter it saves reproduces those logits in
stock PEFT in a process that never imports riemann_zero.

Tolerance: that of tests/distributed/test_engines.py (RTOL = 1e-5): ZeRO averages the two ranks'
gradients (and LOI sums the two ranks' sketches) in another order than one process sums the
global batch, which changes fp32 gradients by ~1e-7 relative; four smooth manifold steps keep that
at a few 1e-7 (LOI: its randomized SVD of fp32 sketches, ~1e-6). A lost row, a doubled step or a
rank training on the other's data moves X by ≥ 1e-2 relative.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from hf_worker import launch, stock_peft_logits  # noqa: E402

RTOL = 1e-5
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
           PYTHONWARNINGS="ignore", PYTHONPATH=str(HERE.parents[1]))
pytestmark = pytest.mark.slow  # 6 Trainer runs, 4 of them 2-process (~2–3 min on 2 cores)


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
    return tmp, res


def _rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("loi", [False, True])
def test_zero_two_processes_equal_one(runs, stage, loi):
    _, res = runs
    ref, got = res["ref", loi], res[stage, loi]
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
    assert (ref - base).abs().max() > 1e-4  # the adapter changes the logits
    assert (dist - ref).abs().max() <= RTOL * ref.abs().max()
