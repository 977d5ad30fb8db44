"""The one optimizer base: Riemannion, StelLA and Tensorion keep their state per name, hand it to
checkpointers through one method pair, resume from state dicts of the earlier layouts exactly, and
check their hyper-parameters against one table."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_model

import riemann_zero as rz
from riemann_zero.optim.base import check_hyper

TARGETS = ["q_proj", "v_proj"]


def _manifold(tiny_llama):
    model = rz.get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8,
                                                             target_modules=TARGETS),
                              init="random", seed=0)
    model.base_model.model.model.norm.weight.requires_grad_(True)  # an AdamW extra
    return model


def _stella(tiny_llama):
    model = peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                       autocast_adapter_dtype=False)
    rz.stella_init(model, seed=0)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    return model


def _plain(tiny_llama):
    model = tiny_llama(seed=0)
    for name, p in model.named_parameters():
        p.requires_grad_("layers.0" in name)  # 2-D weights and 1-D norms
    return model


CASES = {
    "riemannion": (_manifold, lambda m: rz.Riemannion(m, lr=1e-2)),
    "stella": (_stella, lambda m: rz.StelLA(m, lr=1e-2)),
    "tensorion": (_plain, lambda m: rz.Tensorion(
        [p for p in m.parameters() if p.requires_grad], lr=1e-2)),
}


def _step(model, opt, seed: int) -> None:
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _trained(tiny_llama, case: str):
    make_model, make_opt = CASES[case]
    model = make_model(tiny_llama)
    opt = make_opt(model)
    for t in range(2):
        _step(model, opt, t)
    return model, opt


@pytest.mark.parametrize("case", list(CASES))
def test_state_is_kept_per_name_and_torch_state_holds_only_adamw(tiny_llama, case):
    model, opt = _trained(tiny_llama, case)
    assert isinstance(opt, rz.ManifoldOptimizer)
    named = opt.named_state_dict()
    assert named and set(named) == set(opt.state_dict()["named_state"])
    assert all(st["step"] == 2 for st in named.values())
    adamw = {id(p) for g in opt.param_groups if g["kind"] == "adamw" for p in g["params"]}
    assert adamw and {id(p) for p in opt.state} == adamw


def _earlier_layout(case: str, opt, sd: dict) -> dict:
    """The state dict as the code before the one base wrote it."""
    sd = copy.deepcopy(sd)
    named = sd.pop("named_state")
    if case == "riemannion":
        return {**sd, "adapter_state": named}
    if case == "tensorion":
        return {**sd, "tensor_state": named}
    # StelLA: U and its moments in torch.optim's state of lora_B, the rest in that of lora_A
    for i, sl in enumerate(opt._slots):
        st = named[sl.name]
        sd["state"][2 * i] = {k: v for k, v in st.items() if k == "step" or k.endswith("U")}
        sd["state"][2 * i + 1] = {k: v for k, v in st.items()
                                  if k != "step" and not k.endswith("U")}
    return sd


@pytest.mark.parametrize("case", list(CASES))
def test_state_dicts_of_the_earlier_layouts_resume_exactly(tiny_llama, case):
    model, opt = _trained(tiny_llama, case)
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    _step(model, opt, 2)
    after = []
    for sd in (saved, _earlier_layout(case, opt, saved)):
        make_model, make_opt = CASES[case]
        twin = make_model(tiny_llama)
        twin_opt = make_opt(twin)
        twin.load_state_dict(weights)
        twin_opt.load_state_dict(copy.deepcopy(sd))
        assert {id(p) for p in twin_opt.state} <= {id(p) for g in twin_opt.param_groups
                                                   if g["kind"] == "adamw" for p in g["params"]}
        _step(twin, twin_opt, 2)
        after.append({n: p.detach().clone() for n, p in twin.named_parameters()})
    for n, p in after[0].items():
        assert torch.equal(after[1][n], p), n
    if case != "stella":  # StelLA rewrites lora_A = S Vᵀ on load one adapter at a time, which
        # rounds otherwise than the step's batched product (its resume: tests/test_stella.py)
        for n, p in model.named_parameters():
            assert torch.equal(after[0][n], p), n


def test_named_state_of_another_model_is_refused(tiny_llama):
    _, opt = _trained(tiny_llama, "riemannion")
    with pytest.raises(ValueError, match=r"names \['nowhere'\], which this optimizer lacks"):
        opt.load_named_state_dict({"nowhere": {}})


@pytest.mark.parametrize("hp,message", [
    (dict(lr=-1.0), "lr must be >= 0, but got -1.0"),
    (dict(lr="fast"), "lr must be >= 0, but got 'fast'"),
    (dict(betas=(0.9,)), r"betas must be two numbers in \[0, 1\), but got \(0.9,\)"),
    (dict(ortho="qr"), r"ortho must be one of \('svd', 'newton_schulz'\), but got 'qr'"),
    (dict(ns_steps=2.0), "ns_steps must be an int >= 1, but got 2.0"),
])
def test_one_check_names_the_key_and_the_value(hp, message):
    with pytest.raises(ValueError, match=f"^param group 1: {message}$"):
        check_hyper({"weight_decay": 0.0, **hp}, "param group 1: ")
