"""Pieces of the driver: LR schedule, data order, argument parsing, baselines, launch script."""

from __future__ import annotations

import ast
import copy
import subprocess
from pathlib import Path

import pytest
import torch

from riemann_zero.train.build import batch_order, lr_lambda
from riemann_zero.train.cli import parse_args
from riemann_zero.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]


def test_linear_schedule_with_warmup():
    fn = lr_lambda(load_recipe(None, ["schedule.type=linear", "schedule.warmup_ratio=0.1"]), 100)
    values = [fn(s) for s in range(100)]
    assert values[0] < values[5] < values[9] < 1.0  # rising during the 10 warm-up steps
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5)  # half-way through the decay
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert fn(100) == pytest.approx(0.0)


def test_cosine_schedule_with_warmup_steps_and_floor():
    rc = load_recipe(None, ["schedule.type=cosine", "schedule.warmup_steps=4",
                            "schedule.min_lr_ratio=0.1"])
    fn = lr_lambda(rc, 20)
    assert fn(4) == pytest.approx(1.0) and fn(12) == pytest.approx(0.55)
    assert fn(20) == pytest.approx(0.1)


def test_batch_order_partitions_each_epoch():
    n, world, micro = 23, 2, 3
    seen = []
    for rank in range(world):
        batches = batch_order(n, seed=0, epoch=0, rank=rank, world=world, micro=micro)
        assert all(len(b) == micro for b in batches)
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen))  # ranks never share an example
    again = batch_order(n, seed=0, epoch=0, rank=1, world=world, micro=micro)
    assert again == batch_order(n, seed=0, epoch=0, rank=1, world=world, micro=micro)
    assert again != batch_order(n, seed=0, epoch=1, rank=1, world=world, micro=micro)


def test_parse_args_drops_deepspeed_local_rank(capsys):
    assert parse_args(["--local_rank=1", "r.yaml", "max_steps=3"]) == ("r.yaml", ["max_steps=3"])
    assert parse_args(["--local_rank", "0", "r.yaml"]) == ("r.yaml", [])
    with pytest.raises(SystemExit) as exit_:
        parse_args(["max_steps=3"])
    assert exit_.value.code == 2 and "usage" in capsys.readouterr().err


def test_run_sh_is_valid_bash_and_python():
    text = (REPO / "launch" / "run.sh").read_text()
    ast.parse(text)  # DeepSpeed's launcher runs `python -u launch/run.sh ...`
    subprocess.run(["bash", "-n", str(REPO / "launch" / "run.sh")], check=True)
    usage = subprocess.run(["bash", str(REPO / "launch" / "run.sh")], capture_output=True,
                           text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def _tiny_peft(seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj",
                                                                                  "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so that A receives gradients from the first step
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("name", ["adamw", "muon", "rprec_adamw"])
def test_baselines_step_and_round_trip(name):
    from riemann_zero.optim import registry

    model = _tiny_peft()
    opt = registry.spec(name).build(model, lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert all(g["lr"] == pytest.approx(5e-3) for g in opt.param_groups)
    ids = torch.randint(0, 64, (2, 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(before[n], p), f"{name} did not move {n}"
    # state_dict round trip: a fresh optimizer loaded from it takes the identical next step
    state = copy.deepcopy(opt.state_dict())  # load_state_dict may share tensors
    twin = _tiny_peft()
    twin.load_state_dict(model.state_dict())
    opt2 = registry.spec(name).build(twin, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(state)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), n


def test_rprec_is_peft_riemannian_optimizer():
    from riemann_zero.optim import registry

    opt = registry.spec("rprec_adamw").build(_tiny_peft(), lr=1e-3)
    assert type(opt).__name__ == "RiemannianPreconditionedOptimizer"
    assert isinstance(opt, torch.optim.AdamW)


def test_muon_takes_only_lora_matrices():
    from riemann_zero.optim import registry
    from riemann_zero.optim.baselines import CombinedOptimizer

    model = _tiny_peft()
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a 1-D trainable extra
    opt = registry.spec("muon").build(model, lr=1e-3)
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert [p.ndim for g in adamw.param_groups for p in g["params"]] == [1]
