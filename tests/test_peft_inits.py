"""PiSSA and LoRA-GA (PEFT's inits) as baselines: the model is unchanged at step 0, the saved
adapter reproduces the trained model on the ORIGINAL base with stock PEFT, and LoRA-GA's gradient
is averaged over data-parallel ranks so that every rank moves its base weight identically."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from riemann_zero.adapters.export import save_peft_adapter
from riemann_zero.adapters.inits import INITIAL_ATTR, peft_init_model

R = 4


def _base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def _config():
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["pissa", "lora_ga"])
def test_init_keeps_outputs_and_adapter_loads_on_original_base(tmp_path, method):
    base = _base()
    original = copy.deepcopy(base)
    ids = _batch(7)["input_ids"]
    before = _logits(base, ids)
    torch.manual_seed(0)
    model = peft_init_model(base, _config(), method, calibration=[_batch(1), _batch(2)])
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.abs().max() > 0  # a non-zero start, compensated in the base weight
    # W − s·B₀A₀ + s·B₀A₀ in fp32: rounding of O(1) weights, far below 1e-5 on O(1) logits.
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-5)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**_batch(10 + step)).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = _logits(model, ids)
    assert (trained - before).abs().max() > 1e-3  # training moved the model

    save_peft_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * R and cfg["init_lora_weights"] is True
    # Stock PEFT on the original base, in a process that never imports riemann_zero. Same fp32
    # arithmetic in another order (2r-wide factors on W instead of r-wide on W_res).
    from test_layout import stock_peft_logits

    original.save_pretrained(tmp_path / "base")
    loaded = stock_peft_logits(tmp_path / "base", tmp_path / "adapter", ids, tmp_path)
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)


def test_lora_ga_start_is_the_top_right_singular_vectors_of_the_gradient():
    """LoRA-GA (direction ArB2r) starts A₀ at the top-r right singular vectors of the mean full
    gradient of the calibration batches."""
    base = _base()
    probe = copy.deepcopy(base).train()
    batches = [_batch(1), _batch(2)]
    for b in batches:
        (probe(**b).loss / len(batches)).backward()
    grad = probe.model.layers[1].self_attn.v_proj.weight.grad  # 16 × 32: svd_lowrank is exact
    _, s, vh = torch.linalg.svd(grad.double())
    gaps = (s[:R] - s[1:R + 1]) / s[0]
    assert gaps.min() > 1e-3  # distinct singular values: each vector is defined up to sign
    torch.manual_seed(0)
    model = peft_init_model(base, _config(), "lora_ga", calibration=batches)
    a0 = model.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight.double()
    coords = a0 @ vh.T  # A₀ in the gradient's right singular basis: ±I in the first r columns
    # fp32 gradient and SVD: vector error ~ 1e-7 / relative gap (> 1e-3), so 1e-3 has margin.
    torch.testing.assert_close(coords.abs(), torch.eye(R, vh.shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-3)
    assert getattr(model, INITIAL_ATTR)  # kept for the export


def _rank_init(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        base = _base()
        torch.manual_seed(0)  # the driver seeds every rank alike before building
        model = peft_init_model(base, _config(), "lora_ga", calibration=[_batch(1 + rank)],
                                reduce=dist.all_reduce, world=world)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(weights, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_lora_ga_gradient_is_averaged_over_ranks(tmp_path):
    mp.spawn(_rank_init, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    for name in r0:  # same reduced gradient, same seed: bit-identical base and adapters
        assert torch.equal(r0[name], r1[name]), name

    base = _base()
    torch.manual_seed(0)  # after building the base, as on the ranks
    one = peft_init_model(base, _config(), "lora_ga", calibration=[_batch(1), _batch(2)])
    moved = 0
    for name, p in one.named_parameters():
        # One process averages the two losses; two ranks average their gradients: the same mean
        # in another fp32 summation order, through a randomized SVD with the same test matrix.
        torch.testing.assert_close(r0[name], p.detach(), rtol=0, atol=1e-4, msg=name)
        moved += "base_layer" in name and not torch.equal(p, _base().state_dict()[
            name.replace("base_model.model.", "").replace("base_layer.", "")])
    assert moved == 4  # q_proj and v_proj of both layers were shifted by −s·B₀A₀
