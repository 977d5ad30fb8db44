"""Partitioned loading (``model.partitioned_load``): the checkpoint reader, which runs load
partitioned, the peak-RSS probe, and the real driver under ZeRO-3 on the 4-layer SmolLM2 (the
FSDP2 driver runs partitioned by default: tests/train/test_fsdp2.py). The distributed equality of
partitioned loading + LOI with the single-process LOI is in tests/distributed/test_engines.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stock_peft import assert_adapter_is_the_trained_model

from riemann_zero.io import peak_rss_mib
from riemann_zero.sharding.load import CheckpointReader, checkpoint_files, load_local_parts
from riemann_zero.train.preflight import load_mode
from riemann_zero.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(7, 5, generator=gen), "b": torch.randn(7, generator=gen),
               "h": torch.randn(3, 4, generator=gen).bfloat16()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.save(tensors, tmp_path / "expected.pt")
    return tmp_path


def test_reader_ranges_equal_the_stored_tensors(tiny_checkpoint):
    """Any element range [start, stop) of the row-major flattened tensor, in its stored dtype,
    read into a given buffer or a new one (every range of a 7×5 tensor, and a bf16 one)."""
    want = torch.load(tiny_checkpoint / "expected.pt")
    reader = CheckpointReader(tiny_checkpoint)
    assert reader.shape("w") == (7, 5)
    flat = want["w"].reshape(-1)
    for start in range(flat.numel()):
        for stop in range(start, flat.numel() + 1):
            assert torch.equal(reader.read("w", start, stop), flat[start:stop])
    out = torch.empty(6)
    assert reader.read("w", 10, 16, out=out) is out and torch.equal(out, flat[10:16])
    h = reader.read("h", 0, 12)
    assert h.dtype == torch.bfloat16 and torch.equal(h, want["h"].reshape(-1))


def test_local_load_of_a_plain_module_and_one_line_errors(tiny_checkpoint, tmp_path):
    """Without an engine every parameter is read whole; a missing tensor, a wrong shape, a folder
    without safetensors and a truncated file each fail with one line naming it."""
    want = torch.load(tiny_checkpoint / "expected.pt")
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(7, 5))
    module.b = torch.nn.Parameter(torch.zeros(7))
    assert load_local_parts(module, tiny_checkpoint) == 2
    assert torch.equal(module.w, want["w"]) and torch.equal(module.b, want["b"])
    module.extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(KeyError, match="no tensor for parameter extra"):
        load_local_parts(module, tiny_checkpoint)
    del module.extra
    module.w = torch.nn.Parameter(torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"w: the checkpoint holds shape \(7, 5\)"):
        load_local_parts(module, tiny_checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.partitioned_load=false"):
        checkpoint_files(empty)
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-20])
    with pytest.raises(EOFError, match="truncated"):
        CheckpointReader(cut).read("h", 0, 12)


@pytest.mark.parametrize("overrides,mode", [
    (["engine=fsdp2"], "fsdp2"),
    (["deepspeed.zero_optimization.stage=3"], "zero3"),
    (["deepspeed.zero_optimization.stage=2"], "whole"),  # ZeRO-1/2 keep whole weights anyway
    (["deepspeed.zero_optimization.stage=3", "model.partitioned_load=false"], "whole"),
    (["engine=fsdp2", "optimizer.name=adamw", "init.method=pissa"], "whole"),  # SVD of W
    (["engine=fsdp2", "optimizer.name=adamw", "init.method=peft"], "fsdp2"),
])
def test_load_mode(overrides, mode):
    recipe = load_recipe(REPO / "recipes" / "smollm2_commonsense.yaml", overrides)
    assert load_mode(recipe, {}) == mode
    assert load_mode(recipe, {"lm_head.weight": (8, 4)}) == "whole"


def test_peak_rss_grows_with_touched_memory():
    """VmHWM in MiB, checked against two independent sources: getrusage's ru_maxrss (the kernel's
    peak RSS in kB on Linux) in the same process, and the growth of a fresh process that touches
    a 256 MiB buffer (its peak rises by about 256 MiB: not 1024 times that, nor a kB count)."""
    import resource

    before = peak_rss_mib()
    kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB → MiB
    assert before is not None and before > 0
    # both read the same high-water mark; a few MiB may be touched between the two reads
    assert abs(before - kernel) <= max(8.0, 0.02 * kernel), (before, kernel)
    script = ("import torch\n"
              "from riemann_zero.io import peak_rss_mib\n"
              "before = peak_rss_mib()\n"
              "buf = torch.ones(256 * 2**20 // 4)\n"
              "print(before, peak_rss_mib())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    start, end = map(float, proc.stdout.split())
    assert 256 - 8 <= end - start <= 256 + 64, (start, end)  # the buffer, plus a little slack


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "riemann_zero.train",
           str(REPO / "recipes" / "smollm2_commonsense.yaml"),
           "model.name_or_path=asset:smollm2:4", "deepspeed.zero_optimization.stage=3",
           "max_steps=3", "data.train=commonsense:ARC-Easy", "data.train_limit=64",
           "data.eval_limit=4", "data.max_length=64", "lora.target_modules=q_proj,v_proj",
           "train.micro_batch_size=2", "train.gradient_accumulation_steps=1",
           "train.save_every=0", "eval_after.suite=null", "init.p=4", "init.batches=2",
           "logging.tensorboard=false", f"output_dir={out}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_zero3_driver_partitioned_equals_whole_and_saves_a_peft_adapter(tmp_path):
    """The driver on the real 4-layer SmolLM2 (tied embeddings), ZeRO-3 on 2 ranks, Riemannion +
    LOI: loading partitioned (zero.Init, LOI through the engine) and whole (LOI before the
    engine) give the same eval loss at step 0 and the same training losses (fp32; LOI's
    randomized SVD agrees to ~1e-6 and 3 steps keep it there: 1e-5 relative), every rank's peak
    RSS is logged, and the adapter gives the trained model's eval loss in stock PEFT."""
    part, whole = tmp_path / "part", tmp_path / "whole"
    for out, extra in ((part, ()), (whole, ("model.partitioned_load=false",))):
        proc = _torchrun(out, *extra)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = {k: json.loads((d / "run.json").read_text()) for k, d in (("p", part), ("w", whole))}
    assert runs["p"]["load"] == "zero3" and runs["w"]["load"] == "whole"
    for run in runs.values():
        assert len(run["peak_rss_mib"]) == 2 and min(run["peak_rss_mib"]) > 0
        assert len(run["peak_rss_mib_loaded"]) == 2
    rows = {k: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for k, d in (("p", part), ("w", whole))}
    values = {k: [r.get("loss", r.get("eval_loss")) for r in v] for k, v in rows.items()}
    assert len(values["p"]) == len(values["w"]) == 5  # eval at 0, 3 steps, final eval
    for a, b in zip(values["p"], values["w"]):
        assert abs(a - b) <= 1e-5 * abs(b), (values["p"], values["w"])
    assert all(len(r["peak_rss_mib"]) == 2 for r in rows["p"] if "loss" in r)

    # stock PEFT on the original base gives the trained model's final eval loss
    assert_adapter_is_the_trained_model(part, "commonsense:ARC-Easy", 4, 64, tmp_path)
