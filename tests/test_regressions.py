"""Regression tests of behaviour bugs found while rebuilding the package into floors, each named
after the failure it prevents."""

from __future__ import annotations

import pytest
import torch
from test_riemannion import backward, batch, build

import riemann_zero as rz
from riemann_zero.sharding.shards import LocalShards


@pytest.mark.parametrize("name", ["Riemannion", "RiemannSGD", "RiemannAdam"])
def test_every_manifold_optimizer_counts_its_steps(tiny_llama, name):
    """RiemannSGD never counted steps (Riemannion and RiemannAdam did, each its own way); the
    base class now counts once per adapter and step, and the count survives state_dict."""
    model = build(tiny_llama, seed=3)
    opt = getattr(rz, name)(model, lr=1e-3)
    for t in range(3):
        backward(model, batch(t))
        opt.step()
    counts = {st["step"] for st in opt.named_state.values()}
    assert counts == {3} and len(opt.named_state) == len(rz.find_adapters(model))
    twin = getattr(rz, name)(build(tiny_llama, seed=3), lr=1e-3)
    twin.load_state_dict(opt.state_dict())
    assert {st["step"] for st in twin.named_state.values()} == {3}


class _CountingLocal(LocalShards):
    """LocalShards whose reductions are identities that count their calls (a world of one that
    behaves as if every side were sharded)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

        def count(t: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return t

        self.reduce_m = self.reduce_n = count


def test_health_is_one_reduction_per_bucket_with_the_same_numbers(tiny_llama):
    """Health used to run four reductions per adapter in a Python loop (896 collectives per
    logged step at Llama-3-8B). Now one reduction per bucket (of stacked 2r×2r Grams), with the
    same numbers as the unsharded computation (identity reductions: equal to rounding)."""
    model = build(tiny_llama, seed=4)
    opt = rz.Riemannion(model, lr=1e-2)
    backward(model, batch(0))
    opt.step()
    plain = opt.manifold_health()
    counting = _CountingLocal()
    opt.shards = counting
    got = opt.manifold_health()
    buckets = len(opt._buckets(list(opt.adapters)))
    assert counting.calls == buckets < len(opt.adapters)
    for key in plain:  # the same fp64 sums; only the batching differs
        assert got[key] == pytest.approx(plain[key], rel=1e-12, abs=1e-15), key
    # and the numbers are the real ones: recomputed from the parameters, adapter by adapter
    worst_u = max(float((ad.lora_B[:, ad.r:].detach().mT @ ad.lora_B[:, ad.r:].detach()
                         - torch.eye(ad.r, dtype=torch.float64)).norm())
                  for ad in rz.find_adapters(model))
    assert plain["orth_err_U"] == pytest.approx(worst_u, rel=1e-9, abs=1e-15)


def test_manifold_health_of_a_stella_optimizer(tiny_llama):
    """``rz.manifold_health(stella_optimizer)`` took the model branch and failed (a StelLA model
    has no manifold adapters); StelLA runs therefore logged no health."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(dtype=torch.float64),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           autocast_adapter_dtype=False)
    rz.stella_init(model, seed=0)
    opt = rz.StelLA(model, lr=1e-2)
    ids = batch(1)["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    health = rz.manifold_health(opt)
    assert set(health) == {"orth_err_U", "orth_err_V"}
    assert 0.0 <= health["orth_err_U"] < 1e-10 and 0.0 <= health["orth_err_V"] < 1e-10


def test_manifold_health_of_a_model_still_reads_its_parameters(tiny_llama):
    model = build(tiny_llama, seed=5)
    assert rz.manifold_health(model)["orth_err_U"] < 1e-10


@pytest.mark.parametrize("name,key", [("Riemannion", "momentum_K"), ("RiemannAdam", "exp_avg_U")])
def test_state_for_other_rows_is_refused_at_the_first_step(tiny_llama, name, key):
    """Optimizer state written for another row layout (another world size, or a ZeRO checkpoint
    from before the n-side all-to-all exchange, whose K momentum spans all n rows) used to fail
    deep inside the geometry with a shape error; it is refused at the first step after loading
    with one line naming the state and the fix. Matching state still resumes exactly."""
    model = build(tiny_llama, seed=3)
    opt = getattr(rz, name)(model, lr=1e-3)
    backward(model, batch(0))
    opt.step()
    state = opt.state_dict()
    ok_model = build(tiny_llama, seed=3)
    ok = getattr(rz, name)(ok_model, lr=1e-3)
    ok.load_state_dict(state)
    backward(ok_model, batch(1))
    ok.step()  # the same layout: no complaint
    bad_state = {**state, "named_state": {
        n: {k: (v[..., :-1, :] if k == key else v) for k, v in st.items()}
        for n, st in state["named_state"].items()}}
    twin_model = build(tiny_llama, seed=3)
    twin = getattr(rz, name)(twin_model, lr=1e-3)
    twin.load_state_dict(bad_state)
    backward(twin_model, batch(1))
    with pytest.raises(ValueError, match=f"optimizer state '{key}' of adapter .* holds .* rows"):
        twin.step()
