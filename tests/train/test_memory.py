"""The per-rank memory estimate of preflight: its parts, the refusal before any weight loads, the
Llama-3-70B recipes on the meta device, and (slow) the estimate against a measured peak."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from riemann_zero.optim.registry import OPTIMIZERS
from riemann_zero.train.memory import GIB, estimate_memory, memory_error
from riemann_zero.train.preflight import preflight
from riemann_zero.train.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
H100 = ["memory.device_gib=80", "memory.host_gib=1024"]  # 80 GB GPUs, 1 TiB nodes


def _meta_params(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_parts_add_up_and_base_follows_partitioning(tmp_path, no_weights, llama3_config):
    """The table's total is the sum of its parts; the base part is the meta model's parameter
    count x dtype bytes, whole per rank under ZeRO-2 and 1/world under ZeRO-3 and FSDP2."""
    cfg = llama3_config("70B")
    total = _meta_params(cfg)
    assert 70e9 < total < 71e9  # Llama-3-70B: 70.6 B parameters
    rc = load_recipe(REPO / "recipes" / "llama3_70b_commonsense.yaml",
                     [f"output_dir={tmp_path / 'run'}", *H100])
    shapes = preflight(rc, world_size=16, model_config=cfg, local=8, on_gpu=True).linear_shapes
    for over, parts in [([], 16), (["deepspeed.zero_optimization.stage=2"], 1),
                        (["engine=fsdp2"], 16)]:
        r = load_recipe(REPO / "recipes" / "llama3_70b_commonsense.yaml", over)
        est = estimate_memory(r, cfg, world=16, local_ranks=8, on_gpu=True, shapes=shapes)
        assert est.device_total == sum(est.device.values())
        assert est.node_host_total == 8 * sum(est.host.values())
        assert est.device["base"] == total * 2 // parts  # bf16
        assert ("gathered" in est.device) == (parts > 1)
        table = est.table()
        assert all(k in table for k in est.device) and f"{est.device_total / GIB:.2f}" in table
    # The adapters: rank-2r manifold layout on the 7 projections of 80 layers.
    m = {n: s for n, s in shapes.items() if n.rsplit(".", 1)[-1] in rc.lora.target_modules}
    assert len(m) == 7 * 80
    lora = sum(2 * rc.lora.r * (a + b) for a, b in m.values())
    est = estimate_memory(rc, cfg, world=16, local_ranks=8, on_gpu=True, shapes=shapes)
    assert est.device["adapters"] == lora * 2 // 16
    # Riemannion: momentum factors (0.5 per value) + fp32 master, sharded over 16 ranks.
    assert est.device["optimizer"] == int(1.5 * lora * 4) // 16
    # Gradient checkpointing keeps only the layer inputs: far fewer activation bytes.
    off = load_recipe(REPO / "recipes" / "llama3_70b_commonsense.yaml",
                      ["model.gradient_checkpointing=false"])
    est_off = estimate_memory(off, cfg, world=16, local_ranks=8, on_gpu=True, shapes=shapes)
    assert est_off.device["activations"] > 10 * (est.device["activations"]
                                                 - 4 * 256 * 128256 * 16)  # logits excluded


def _state_values(opt) -> int:
    """Optimizer-state values (tensors of more than one element) wherever the class keeps them."""
    stores = [opt.state, getattr(opt, "named_state", {})]
    return sum(v.numel() for store in stores for st in store.values() for v in st.values()
               if torch.is_tensor(v) and v.numel() > 1)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_per_value_matches_the_real_optimizer_state(name, tiny_llama):
    """The registry's state_per_value (what the estimate multiplies) against the state each
    optimizer really keeps after one step on a tiny Llama. Allowance 15 % above: StelLA's r x r
    S and its moments, negligible at real sizes, are ~8 % at r = 4 here."""
    import peft
    from peft import LoraConfig

    from riemann_zero.adapters.layout import get_peft_model
    from riemann_zero.train.build import build_optimizer

    row = OPTIMIZERS[name]
    cfg = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0,
                     target_modules=["q_proj", "v_proj", "up_proj"])
    base = tiny_llama(dtype=torch.float32)
    if row.layout == "manifold":
        model = get_peft_model(base, cfg, init="random", seed=0)
    else:
        model = peft.get_peft_model(base, cfg)
        if row.prepare is not None:
            row.prepare(model, seed=0)
    init = "zero" if row.layout == "manifold" else "peft"
    opt = build_optimizer(load_recipe(None, [f"optimizer.name={name}", f"init.method={init}"]),
                          model)
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ratio = _state_values(opt) / values
    assert row.state_per_value <= ratio + 1e-9 <= 1.15 * row.state_per_value + 1e-9, ratio


def test_llama3_70b_recipes_fit_two_nodes_and_refuse_what_does_not_fit(tmp_path, no_weights,
                                                                      llama3_config):
    """On the meta device: 2 nodes x 8 H100-80GB fit under ZeRO-3; ZeRO-2 (the whole 131 GiB
    base on each rank) is refused, and so is 1 x 8 on 24 GiB GPUs, each with one line naming the
    figure and the fixes. (1 x 8 H100-80GB fits: ~26 GiB per rank.)"""
    cfg = llama3_config("70B")
    for name in ("llama3_70b_commonsense", "llama3_70b_commonsense_adamw"):
        path = REPO / "recipes" / f"{name}.yaml"
        out = [f"output_dir={tmp_path / name}"]
        plan = preflight(load_recipe(path, out + H100), world_size=16, model_config=cfg,
                         local=8, on_gpu=True)
        assert plan.grad_accum == 1 and plan.global_batch == 64
        assert plan.memory.device_total < 80 * GIB and plan.memory.node_host_total < 1024 * GIB
        assert "memory estimate per rank, GPU (ZeRO-3, base 1/16" in plan.memory.table()
        eight = preflight(load_recipe(path, out + H100), world_size=8, model_config=cfg,
                          local=8, on_gpu=True)
        assert eight.grad_accum == 2 and eight.memory.device_total < 80 * GIB
        with pytest.raises(RecipeError) as err:
            preflight(load_recipe(path, out + H100 + ["deepspeed.zero_optimization.stage=2"]),
                      world_size=16, model_config=cfg, local=8, on_gpu=True)
        line = str(err.value)
        assert "\n" not in line and "exceeds the 80.0 GiB of device memory" in line
        assert "largest part: base 131" in line and "zero_optimization.stage=3" in line
        with pytest.raises(RecipeError, match=r"exceeds the 24.0 GiB .* more ranks"):
            preflight(load_recipe(path, out + H100 + ["memory.device_gib=24"]), world_size=8,
                      model_config=cfg, local=8, on_gpu=True)
        # memory.check=false: the estimate is printed, the run is not refused
        plan = preflight(load_recipe(path, out + H100 + ["memory.device_gib=24",
                                                         "memory.check=false"]),
                         world_size=8, model_config=cfg, local=8, on_gpu=True)
        assert plan.memory.device_total > 24 * GIB


def test_host_side_counts_every_local_rank(no_weights, llama3_config):
    """The host check is per node: local ranks x per-rank host bytes against MemAvailable."""
    cfg = llama3_config("70B")
    rc = load_recipe(REPO / "recipes" / "llama3_70b_commonsense.yaml", [])
    from riemann_zero.train.preflight import _linear_shapes

    shapes = _linear_shapes(cfg)
    one = estimate_memory(rc, cfg, world=16, local_ranks=1, on_gpu=True, shapes=shapes)
    eight = estimate_memory(rc, cfg, world=16, local_ranks=8, on_gpu=True, shapes=shapes)
    assert eight.node_host_total == 8 * one.node_host_total
    limit = (one.node_host_total + eight.node_host_total) // 2
    assert memory_error(one, None, limit, world=16) is None
    assert "of host memory per node (8 ranks" in memory_error(eight, None, limit, world=16)


def test_recipe_refused_before_any_weight_loads(tmp_path, no_weights, monkeypatch, capsys):
    """A CPU run whose estimate exceeds the (recipe-given) host memory: exit 2, one line naming
    the figure and the fixes, nothing loaded (no_weights), no run started in output_dir."""
    from riemann_zero.train import cli as train

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="2").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    code = train.cli([str(REPO / "recipes" / "smollm2_commonsense.yaml"),
                      "model.name_or_path=asset:smollm2:4", f"output_dir={out}",
                      "memory.host_gib=0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "memory estimate:" in err[0] and "exceeds the 0.5 GiB available" in err[0]
    assert "gradient_checkpointing=true" in err[0] and "memory.check=false" in err[0]
    assert not (out / "run.json").exists()


VMHWM = ("import atexit, sys\n"
         "def peak():\n"
         "    for line in open('/proc/self/status'):\n"
         "        if line.startswith('VmHWM:'):\n"
         "            print('VMHWM_KB', line.split()[1], flush=True)\n"
         "atexit.register(peak)\n"
         "from riemann_zero.train.cli import cli\n"
         "sys.exit(cli(sys.argv[1:]))\n")


@pytest.mark.slow
def test_estimate_within_30_percent_of_measured_peak(tmp_path):
    """The real SmolLM2 (4 layers, fp32) through the driver in one process under ZeRO-2 (the base
    is whole on every rank, so partitioned loading does not change it): the estimate is within
    30 % of the process's measured peak resident memory (VmHWM). Packed rows make every
    micro-batch max_length tokens long, as the estimate assumes."""
    args = [str(REPO / "recipes" / "smollm2_commonsense.yaml"),
            "model.name_or_path=asset:smollm2:4", "max_steps=2", "data.packing=true",
            "data.train_limit=40", "data.eval_limit=0",
            "eval_after=null", "init.method=zero", "deepspeed.zero_optimization.stage=2",
            f"output_dir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", VMHWM, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    measured = int(proc.stdout.split("VMHWM_KB")[-1].split()[0]) * 1024
    rc = load_recipe(args[0], args[1:])
    est = preflight(rc, world_size=1, local=1, on_gpu=False).memory
    error = est.device_total / measured - 1
    print(json.dumps({"estimate_gib": est.device_total / GIB, "measured_gib": measured / GIB,
                      "error": error, "parts_gib": {k: v / GIB for k, v in est.device.items()}}))
    assert math.isfinite(error) and abs(error) < 0.30, (est.table(), measured / GIB)


def test_zero_offload_moves_state_and_weights_to_the_host(no_weights, llama3_config):
    """ZeRO-3 with offload_optimizer/offload_param to cpu: the optimizer state and the base
    partition leave the device part and appear in the host part, byte for byte."""
    cfg = llama3_config("70B")
    from riemann_zero.train.preflight import _linear_shapes

    shapes = _linear_shapes(cfg)
    path = REPO / "recipes" / "llama3_70b_commonsense.yaml"
    plain = estimate_memory(load_recipe(path, []), cfg, world=16, local_ranks=8, on_gpu=True,
                            shapes=shapes)
    off = estimate_memory(load_recipe(path, [
        "deepspeed.zero_optimization.offload_optimizer.device=cpu",
        "deepspeed.zero_optimization.offload_param.device=cpu"]), cfg, world=16, local_ranks=8,
        on_gpu=True, shapes=shapes)
    assert "optimizer" not in off.device and "base" not in off.device
    assert off.host["offload"] == plain.device["optimizer"] + plain.device["base"]
    assert off.device_total == plain.device_total - off.host["offload"]
