"""The engine classes of the driver: one lookup from the recipe, each engine's self-description
(what the optimizer registry, the load, the preflight and the memory estimate read), and the
rule that keeps it so: no other module of the driver or the Trainer integration compares engine
or load-mode names, and no function of the driver grows past 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from riemann_zero.optim import registry
from riemann_zero.optim.metrics import step_metrics
from riemann_zero.train.engines import ENGINE_CLASSES, DeepSpeedEngine, FSDP2Engine, engine_for
from riemann_zero.train.engines.loading import META, WHOLE, ZERO_INIT, load_kind
from riemann_zero.train.help import schema_keys
from riemann_zero.train.recipe import ENGINES, load_recipe

REPO = Path(__file__).resolve().parents[2]
NAMES = {"deepspeed", "fsdp2", "zero3", "whole", "local", "zero12", "ddp"}


def test_every_recipe_engine_has_exactly_one_class():
    assert sorted(ENGINE_CLASSES) == sorted(ENGINES)
    for name in ENGINES:
        engine = engine_for(load_recipe(None, [f"engine={name}"]))
        assert type(engine) is ENGINE_CLASSES[name] and engine.module is None  # nothing started


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_deepspeed_describes_itself_per_stage(stage, bf16):
    """ZeRO-0 leaves parameters whole; only its bf16 wrapper copies masters back."""
    d = DeepSpeedEngine.describe({"zero_optimization": {"stage": stage}}, bf16=bf16)
    assert (d.where, d.whole, d.copies_back) == (f"ZeRO-{stage}", stage == 0,
                                                 bf16 and stage == 0)


def test_fsdp2_describes_itself_whatever_the_deepspeed_block_says():
    for config in ({}, {"zero_optimization": {"stage": 0}}, {"bf16": {"enabled": True}}):
        d = FSDP2Engine.describe(config, bf16=True)
        assert (d.where, d.whole, d.copies_back) == ("FSDP2", False, False)


@pytest.mark.parametrize("name", sorted(registry.OPTIMIZERS))
def test_optimizer_error_is_the_registry_answer_for_the_description(name):
    for cls, config in [(DeepSpeedEngine, {"zero_optimization": {"stage": s}}) for s in range(4)
                        ] + [(FSDP2Engine, {})]:
        for bf16 in (False, True):
            d = cls.describe(config, bf16=bf16)
            want = registry.engine_error(name, where=d.where, whole=d.whole,
                                         copies_back=d.copies_back, bf16=bf16)
            assert cls.optimizer_error(name, config, bf16=bf16) == want


@pytest.mark.parametrize("overrides,load", [
    (["engine=fsdp2"], META),
    (["deepspeed.zero_optimization.stage=3"], ZERO_INIT),
    (["deepspeed.zero_optimization.stage=1"], WHOLE),
    (["engine=fsdp2", "model.partitioned_load=false"], WHOLE),
])
def test_each_engine_chooses_its_load_and_its_name_finds_it_again(overrides, load):
    recipe = load_recipe(REPO / "recipes" / "smollm2_commonsense.yaml", overrides)
    chosen = engine_for(recipe).load({})
    assert chosen is load and load_kind(chosen.name) is load
    assert chosen.partitioned == (load is not WHOLE)
    assert chosen.after_sharding == (load is META)
    with pytest.raises(ValueError, match="load mode must be one of"):
        load_kind("sharded")


@pytest.mark.parametrize("overrides,partitioned,shards_state,offload", [
    (["engine=fsdp2"], True, True, False),
    (["deepspeed.zero_optimization.stage=0"], False, False, False),
    (["deepspeed.zero_optimization.stage=2"], False, True, False),
    (["deepspeed.zero_optimization.stage=3",
      "deepspeed.zero_optimization.offload_optimizer.device=cpu"], True, True, True),
])
def test_memory_facts_follow_the_engine(overrides, partitioned, shards_state, offload):
    facts = engine_for(load_recipe(None, overrides)).memory_facts()
    assert (facts.partitions_base, facts.shards_state, facts.offload_optimizer) == (
        partitioned, shards_state, offload)


def test_step_metrics_names_health_and_bytes_in_one_place(tiny_llama):
    """The driver and the Trainer log the same keys: ``manifold/…`` (health; left out on
    request) and ``comm/…`` (bytes of the last step; none on one process)."""
    from peft import LoraConfig

    import riemann_zero as rz

    model = rz.get_peft_model(tiny_llama(seed=1), LoraConfig(r=2, target_modules=["q_proj"]),
                              init="random", init_scale=0.05)
    opt = rz.Riemannion(model, lr=1e-2)
    out = model(input_ids=torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8))
    out.loss.backward()
    opt.step()
    got = step_metrics(opt)
    health = rz.manifold_health(opt)
    assert {k: v for k, v in got.items() if k.startswith("manifold/")} == {
        f"manifold/{k}": float(v) for k, v in health.items()}
    opt.last_step_comm = {"all_reduce.gram_m": 40}
    assert step_metrics(opt, health=False) == {"comm/all_reduce.gram_m": 40}


def _sources(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((REPO / "riemann_zero" / f).rglob("*.py"))]


def _name_switches(path: Path) -> list[str]:
    """Comparisons with, membership tests in, and dict literals keyed by engine or load-mode
    names in one file. A dict keyed by recipe keys only (help's table: ``deepspeed`` is the
    recipe's section there) is not a switch."""
    schema = {key for key, _, _ in schema_keys()}
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            consts = [n for n in [node.left, *node.comparators] if isinstance(n, ast.Constant)]
            consts += [e for n in node.comparators if isinstance(n, (ast.Tuple, ast.List, ast.Set))
                       for e in n.elts if isinstance(e, ast.Constant)]
            hits += [f"{path.name}:{node.lineno}" for c in consts if c.value in NAMES]
        elif isinstance(node, ast.Dict) and not all(
                isinstance(k, ast.Constant) and k.value in schema for k in node.keys):
            hits += [f"{path.name}:{node.lineno}" for k in node.keys
                     if isinstance(k, ast.Constant) and k.value in NAMES]
    return hits


def test_no_engine_or_load_name_is_switched_on_outside_the_engines():
    """Adding an engine touches train/engines/ (and the recipe's choice list), nothing else."""
    outside = [p for p in _sources("train", "hf") if "engines" not in p.parts]
    assert [h for p in outside for h in _name_switches(p)] == []
    # and the checker sees the switches where they are allowed to live
    assert _name_switches(REPO / "riemann_zero" / "train" / "engines" / "__init__.py")


def test_no_function_of_the_driver_is_over_100_lines():
    long = [f"{p.relative_to(REPO)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in _sources("train") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 100]
    assert long == []
