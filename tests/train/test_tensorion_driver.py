"""Tensorion in the driver: per-factor Muon on LoRA adapters, full fine-tuning of parameters
chosen by ``model.trainable`` (checked in preflight), exact resume through the checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_probe import assert_resumed, probe_env, tag_metrics

from riemann_zero.optim import registry
from riemann_zero.train.cli import STOP_EXIT_CODE
from riemann_zero.train.preflight import preflight
from riemann_zero.train.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
MOE = dict(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
           num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)


def _ns_fp64(grad, coefficients, steps, eps):
    """torch.optim.Muon's Newton–Schulz without its bf16 cast (the precision ours runs at)."""
    a, b, c = coefficients
    x = grad.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


def test_tensorion_on_lora_equals_per_factor_muon(tiny_llama, monkeypatch):
    """The registry rows ``tensorion`` and ``muon`` on the same PEFT LoRA model, with the same
    scaling (lr_scale="rms" ↔ adjust_lr_fn="match_rms_adamw"), momentum and weight decay, give
    the same adapters: on 2-D factors Tensorion is Muon (NS at the same precision)."""
    import peft
    import torch.optim._muon as muon

    monkeypatch.setattr(muon, "_zeropower_via_newtonschulz", _ns_fp64)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                             init_lora_weights="gaussian")
    models = [peft.get_peft_model(tiny_llama(seed=0), config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    hp = dict(lr=0.01, momentum=0.9, weight_decay=0.1)
    opts = [registry.spec("tensorion").build(models[0], **hp, nesterov=True),
            registry.spec("muon").build(models[1], **hp, nesterov=True,
                                        adjust_lr_fn="match_rms_adamw")]
    ids = torch.randint(0, 64, (3, 4, 10), generator=torch.Generator().manual_seed(1))
    for batch in ids:
        for model, opt in zip(models, opts):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    a, b = (dict((n, p.detach()) for n, p in m.named_parameters() if "lora_" in n)
            for m in models)
    assert len(a) == 4  # one layer × (q, v) × (A, B)
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= 1e-10, name
    start = dict(peft.get_peft_model(tiny_llama(seed=0), config).named_parameters())
    assert any(float((a[n] - start[n]).abs().max()) > 1e-4 for n in a)  # the adapters moved


def _moe_recipe(tmp_path, *overrides):
    return load_recipe(None, ["model.name_or_path=tiny-moe", f"output_dir={tmp_path / 'r'}",
                              "optimizer.name=tensorion", "init.method=peft", *overrides])


def _moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**MOE)


def test_preflight_lists_matched_parameters(tmp_path):
    plan = preflight(_moe_recipe(tmp_path, r"model.trainable=mlp\.experts\."),
                     model_config=_moe_config())
    assert plan.trainable == {
        f"model.layers.{i}.mlp.experts.{n}": s for i in range(2)
        for n, s in (("gate_up_proj", (4, 16, 16)), ("down_proj", (4, 16, 8)))}


@pytest.mark.parametrize("overrides,match", [
    ([r"model.trainable=mlp\.expert_stack\."], "matches no parameter of Qwen3MoeConfig"),
    (["model.trainable=experts("], "is not a regular expression"),
    ([r"model.trainable=mlp\.experts\.", "optimizer.name=muon"],
     "model.trainable .full fine-tuning. needs one of the optimizers"),
    (["optimizer.options.unfolding=most_square"],
     "optimizer.options.unfolding must be one of"),
    (["optimizer.options.ortho=qr"], "optimizer.options.ortho must be one of"),
    ([r"model.trainable=mlp\.experts\.", "optimizer.options.unfold=online"],
     "optimizer.options.unfold is not an option of optimizer 'tensorion' .did you mean "
     "'unfolding'"),
])
def test_bad_full_finetune_recipes_fail_in_preflight(tmp_path, overrides, match):
    with pytest.raises(RecipeError, match=match):
        preflight(_moe_recipe(tmp_path, *overrides), model_config=_moe_config())


def _train(out: Path, *extra: str, log: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if log is not None:
        env = probe_env(env, log)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    common = ["max_steps=6", "train.save_every=3", "train.eval_every=3", "data.train_limit=64",
              "data.eval_limit=8", "data.max_length=48", "train.micro_batch_size=2",
              "train.gradient_accumulation_steps=2", "schedule.warmup_steps=2"]
    return subprocess.run([sys.executable, "-m", "riemann_zero.train",
                           str(REPO / "recipes" / "moe_tensorion.yaml"), *common,
                           f"output_dir={out}", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def _losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {("eval" if "eval_loss" in r else "train", r["step"]): r.get("eval_loss", r.get("loss"))
            for r in rows}


VARIANTS = {
    # ZeRO-2 with one process: flat fp32 partitions, online unfolding kept in the state.
    "zero2_online": ["optimizer.options.unfolding=online", "optimizer.options.reselect_every=2"],
    "zero0": ["deepspeed.zero_optimization.stage=0"],
    "zero3": ["deepspeed.zero_optimization.stage=3"],
}


@pytest.mark.parametrize("variant", [
    "zero2_online", pytest.param("zero0", marks=pytest.mark.slow),
    pytest.param("zero3", marks=pytest.mark.slow)])
def test_moe_recipe_resumes_exactly(tmp_path, variant):
    """recipes/moe_tensorion.yaml, killed after step 4 (last checkpoint 3) and resumed: the loss
    trajectory equals the uninterrupted run's bit for bit (momentum, step counts and the chosen
    unfoldings come back from the checkpoint), and the trained experts are saved."""
    opts = VARIANTS[variant]
    full = _train(tmp_path / "full", *opts, log=tmp_path / "full.forwards")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "model.trainable matched 4 parameters" in full.stdout
    cut = tmp_path / "cut"
    first = _train(cut, *opts, "stop_after=4")
    assert first.returncode == STOP_EXIT_CODE, first.stderr[-3000:]
    tag_metrics(cut)
    second = _train(cut, *opts, log=tmp_path / "resumed.forwards")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    # resumed, not restarted: micro-batches of 2, gradient accumulation 2
    assert_resumed(tmp_path / "full.forwards", tmp_path / "resumed.forwards", cut, at=3, total=6,
                   micro_per_step=2)
    expected, got = _losses(tmp_path / "full"), _losses(cut)
    assert sorted(got) == sorted(expected)
    for key in sorted(expected):  # same layout and threads: bit-identical arithmetic
        assert got[key] == expected[key], f"{key}: resumed {got[key]} vs full {expected[key]}"
    trained = torch.load(cut / "trained" / "params.pt")
    again = torch.load(tmp_path / "full" / "trained" / "params.pt")
    assert sorted(trained) == sorted(again) and len(trained) == 4
    assert all(t.ndim == 3 and torch.equal(t, again[n]) for n, t in trained.items())


@pytest.mark.slow
def test_moe_recipe_resumes_exactly_under_fsdp2(tmp_path):
    """torchrun, 2 processes, engine=fsdp2: the experts are Shard(0) DTensors, each rank keeps
    the momentum of its rows and saves it per rank; a killed and resumed run equals the
    uninterrupted one, and the saved experts are whole."""
    import socket

    def torchrun(out: Path, *extra: str, log: Path | None = None) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if log is not None:
            env = probe_env(env, log)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(port), "-m", "riemann_zero.train",
               str(REPO / "recipes" / "moe_tensorion.yaml"), "engine=fsdp2", "max_steps=4",
               "train.save_every=2", "train.eval_every=0", "data.train_limit=64",
               "data.eval_limit=8", "data.max_length=48", "train.micro_batch_size=2",
               "optimizer.options.unfolding=online", f"output_dir={out}", *extra]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)

    full = torchrun(tmp_path / "full", log=tmp_path / "full.forwards")
    assert full.returncode == 0, (full.stdout + full.stderr)[-4000:]
    cut = tmp_path / "cut"
    first = torchrun(cut, "stop_after=3")
    assert first.returncode != 0
    tag_metrics(cut)
    second = torchrun(cut, log=tmp_path / "resumed.forwards")
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert _losses(cut) == _losses(tmp_path / "full")
    # resumed at the step-2 checkpoint, one micro-batch per step on each of the 2 ranks
    assert_resumed(tmp_path / "full.forwards", tmp_path / "resumed.forwards", cut, at=2, total=4,
                   micro_per_step=1, ranks=2)
    trained = torch.load(tmp_path / "full" / "trained" / "params.pt")
    assert {tuple(t.shape) for t in trained.values()} == {(8, 128, 64), (8, 64, 64)}
