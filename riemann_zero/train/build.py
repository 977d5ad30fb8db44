"""What the driver builds from a recipe: the schedule, the data order, the model (base + LoRA +
initialisation) and the optimizer (from its registry row). The DeepSpeed config is completed and
validated in preflight."""

from __future__ import annotations

import math
from typing import Any

from riemann_zero.adapters.inits import PEFT_INITS, peft_init_model
from riemann_zero.adapters.layout import get_peft_model
from riemann_zero.adapters.loi import loi_init
from riemann_zero.train import registry
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
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    mine = perm[: (n // world) * world][rank::world].tolist()
    return [mine[i:i + micro] for i in range(0, len(mine) - micro + 1, micro)]


def build_model(recipe: Recipe, plan: Plan, calibration: list[dict], device: Any = "cpu",
                reduce: Any = None, world: int = 1) -> Any:
    """Base model + LoRA (+ LOI) on ``device``.

    Args:
        recipe, plan: the run.
        calibration: this rank's LOI calibration batches, already on ``device``.
        device: where the model lives.
        reduce: in-place sum over ranks of LOI's sketches and LoRA-GA's gradients (None for one
            process), so that every rank ends with the same initial point.
        world: number of ranks summed by ``reduce``.
    """
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    bf16 = bool(recipe.deepspeed.get("bf16", {}).get("enabled", False))
    dtype = {"auto": torch.bfloat16 if bf16 else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[recipe.model.dtype]
    base = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype).to(device)
    if recipe.model.gradient_checkpointing:
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    if plan.trainable:  # full fine-tuning of the parameters preflight matched; no LoRA
        for name, p in base.named_parameters():
            p.requires_grad_(name in plan.trainable)
        zero = recipe.deepspeed.get("zero_optimization", {}) or {}
        if recipe.engine == "deepspeed" and int(zero.get("stage", 0)) == 3:
            # ZeRO-3 re-gathers parameters for backward from hooks on module inputs that require
            # grad; with everything upstream of the first trained tensor frozen there are none,
            # and backward meets released (empty) weights. Make the embedding output require it.
            base.enable_input_require_grads()
        return base
    if recipe.adapter.type != "lora":  # PEFT's OFT/BOFT, trained by the AdamW row
        import peft

        return _portable_base_name(peft.get_peft_model(base, orthogonal_config(recipe)), recipe)
    lc = recipe.lora
    config = LoraConfig(r=lc.r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout,
                        target_modules=list(lc.target_modules), bias="none", task_type="CAUSAL_LM")
    row = registry.spec(recipe.optimizer.name)
    method = recipe.init.method
    if row.layout == "manifold":
        model = get_peft_model(base, config, init="random" if method == "random" else "zero",
                               seed=recipe.seed)
        if method == "loi":
            loi_init(model, calibration, p=recipe.init.p, q=recipe.init.q,
                     alpha=recipe.init.alpha, seed=recipe.seed, reduce=reduce)
        return _portable_base_name(model, recipe)
    if method in PEFT_INITS:
        model = peft_init_model(base, config, method, calibration=calibration,
                                niter=recipe.init.niter, reduce=reduce, world=world)
    else:
        import peft

        model = peft.get_peft_model(base, config)
    if row.prepare is not None:  # e.g. StelLA's orthonormal U S Vᵀ
        row.prepare(model, seed=recipe.seed)
    return _portable_base_name(model, recipe)


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
