"""What the driver builds from a recipe: the schedule, the data order, the model (base + LoRA +
initialisation) and the optimizer (from its registry row). The DeepSpeed config is completed and
validated in preflight."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from riemann_zero.adapters.inits import PEFT_INITS, peft_init_model
from riemann_zero.adapters.layout import find_adapters, get_peft_model, init_points, lora_layers
from riemann_zero.adapters.loi import loi_init
from riemann_zero.optim import registry
from riemann_zero.sharding.params import assign
from riemann_zero.train.engines import Engine
from riemann_zero.train.engines.loading import load_kind, materialize, model_dtype
from riemann_zero.train.preflight import Plan
from riemann_zero.train.recipe import Recipe, orthogonal_config

__all__ = ["lr_lambda", "batch_order", "build_model", "build_optimizer"]


def lr_lambda(recipe: Recipe, total_steps: int):
    """Multiplier of the base lr at a step: linear warm-up, then linear, cosine or constant."""
    sc = recipe.schedule
    warmup = sc.warmup_steps if sc.warmup_steps is not None else int(sc.warmup_ratio * total_steps)
    floor = sc.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if sc.type == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if sc.type == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return fn


def batch_order(n: int, *, seed: int, epoch: int, rank: int, world: int, micro: int) -> list:
    """Example indices of each micro-batch of one epoch on one rank. Deterministic, so the
    data-loader position saved in a checkpoint is just a count of micro-batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    mine = perm[: (n // world) * world][rank::world].tolist()
    return [mine[i:i + micro] for i in range(0, len(mine) - micro + 1, micro)]


def build_model(recipe: Recipe, plan: Plan, calibration: list[dict], engine: Engine,
                device: Any = "cpu", reduce: Any = None, world: int = 1
                ) -> tuple[Any, Callable[[], None] | None]:
    """Base model + LoRA (+ LOI) on ``device``, created as ``plan.load_mode`` says.

    Args:
        recipe, plan: the run.
        calibration: this rank's LOI calibration batches, already on ``device``.
        engine: the run's engine (not started yet; full fine-tuning asks it what it needs).
        device: where the model lives.
        reduce: in-place sum over ranks of LOI's sketches and LoRA-GA's gradients (None for one
            process), so that every rank ends with the same initial point.
        world: number of ranks summed by ``reduce``.
    Returns:
        the model and, for partitioned loading, what is left to do once the engine has laid it
        out (weights read after sharding: storage, weights and the adapters' start; any
        partitioned load: LOI), else None.
    """
    from peft import LoraConfig

    load = load_kind(plan.load_mode)
    base, prefixes = load.create(plan.model_path, plan.deepspeed, model_dtype(recipe), device)
    if recipe.model.gradient_checkpointing:
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    if plan.trainable:  # full fine-tuning of the parameters preflight matched; no LoRA
        for name, p in base.named_parameters():
            p.requires_grad_(name in plan.trainable)
        engine.prepare_full_finetune(base)  # e.g. ZeRO-3's gather hooks need grad-requiring inputs
        return base, None
    if recipe.adapter.type != "lora":  # PEFT's OFT/BOFT, trained by the AdamW row
        import peft

        return _portable_base_name(peft.get_peft_model(base, orthogonal_config(recipe)),
                                   recipe), None
    lc = recipe.lora
    config = LoraConfig(r=lc.r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout,
                        target_modules=list(lc.target_modules), bias="none", task_type="CAUSAL_LM")
    row = registry.spec(recipe.optimizer.name)
    method = recipe.init.method
    start = "random" if method == "random" else "zero"
    if row.layout == "manifold":
        model = get_peft_model(base, config, init=start, seed=recipe.seed)

        def finish() -> None:
            if load.after_sharding:
                materialize(model, plan, prefixes, device)
                init_points(find_adapters(model), start, seed=recipe.seed)
            if method == "loi":  # on the partitioned model: layer inputs and output grads only
                loi_init(model, calibration, p=recipe.init.p, q=recipe.init.q,
                         alpha=recipe.init.alpha, seed=recipe.seed, reduce=reduce)

        if not load.partitioned:
            finish()
            return _portable_base_name(model, recipe), None
        return _portable_base_name(model, recipe), finish
    if method in PEFT_INITS:
        model = peft_init_model(base, config, method, calibration=calibration,
                                niter=recipe.init.niter, reduce=reduce, world=world)
    else:
        import peft

        model = peft.get_peft_model(base, config)
    if row.prepare is not None:  # e.g. StelLA's orthonormal U S Vᵀ
        row.prepare(model, seed=recipe.seed)
    model = _portable_base_name(model, recipe)
    if not load.after_sharding:
        return model, None

    def finish_plain() -> None:
        materialize(model, plan, prefixes, device)
        _peft_default_start(model, seed=recipe.seed)

    return model, finish_plain


@torch.no_grad()
def _peft_default_start(model: Any, seed: int) -> None:
    """PEFT's default LoRA start (lora_A kaiming-uniform with a = √5, i.e. U(±1/√n); lora_B = 0),
    drawn whole from ``seed`` in module order (the same on every rank) and written to this rank's
    shards: the meta-device adapters of a partitioned FSDP2 load have no values yet."""
    gen = torch.Generator().manual_seed(seed)
    for _, module in lora_layers(model):
        for name in module.lora_A:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            bound = 1.0 / math.sqrt(a.shape[1])
            assign(a, (torch.rand(tuple(a.shape), generator=gen) * 2 - 1) * bound)
            assign(b, torch.zeros(tuple(b.shape)))


def _portable_base_name(model: Any, recipe: Recipe) -> Any:
    """The exported adapter names its base as the recipe does (a hub id, or ``asset:smollm2:4``,
    which resolves on any machine), not this machine's cache path (that goes into run.json)."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = recipe.model.name_or_path
    return model


def build_optimizer(recipe: Recipe, model: Any) -> Any:
    """The recipe's optimizer on the (PEFT) model: its registry row's builder, given the row's
    common recipe keys and ``optimizer.options``."""
    oc = recipe.optimizer
    row = registry.spec(oc.name)
    kwargs = {key: getattr(oc, key) for key in row.recipe_keys}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return row.build(model, **kwargs, **oc.options)
