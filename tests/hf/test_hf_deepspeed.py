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

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
RTOL = 1e-5
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
           PYTHONWARNINGS="ignore", PYTHONPATH=str(HERE.parents[1]))
pytestmark = pytest.mark.slow  # 6 Trainer runs, 4 of them 2-process (~2–3 min on 2 cores)


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(tmp: Path, name: str, world: int, **spec) -> dict:
    out = tmp / name
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"out": str(out), "steps": 4, **spec}))
    launch = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
        f"--master-port={_port()}"]
    proc = subprocess.run([*launch, str(HERE / "hf_worker.py"), str(path)], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "result.pt")


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
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        from hf_worker import LLAMA, VOCAB, SEQ
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
        out = []
        for path in ({str(saved)!r}, {str(tmp / f"ref_loi{int(loi)}" / "adapter")!r}, None):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**LLAMA)).float()
            if path:
                model = PeftModel.from_pretrained(model, path)
            with torch.no_grad():
                out.append(model.eval()(input_ids=ids).logits)
        assert "riemann_zero" not in sys.modules
        torch.save(out, {str(tmp_path / "logits.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**ENV, "PYTHONPATH": ""},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist, ref, base = torch.load(tmp_path / "logits.pt")
    assert (ref - base).abs().max() > 1e-4  # the adapter changes the logits
    assert (dist - ref).abs().max() <= RTOL * ref.abs().max()
