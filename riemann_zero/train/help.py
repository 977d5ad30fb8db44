"""``python -m riemann_zero.train --help``: every recipe section and key with its default and a
one-line meaning. Keys and defaults are read from the schema (:mod:`~riemann_zero.train.recipe`),
so they cannot drift; the meanings are in ``MEANINGS``, and a test checks that every schema key
has one and no meaning is left without its key."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from riemann_zero.optim import registry
from riemann_zero.train.recipe import SMOKE, Recipe

__all__ = ["MEANINGS", "schema_keys", "help_text"]

MEANINGS: dict[str, str] = {
    "output_dir": "where adapter/, checkpoints/, metrics.jsonl, run.json and eval/ go",
    "max_steps": "optimizer steps (caps, and when set defines, the run; null: train.epochs)",
    "seed": "seed of the data order, the adapter initialisation and dropout",
    "resume": "auto (newest intact checkpoint), never, or a checkpoint folder",
    "stop_after": "stop right after this step as if killed (tests of resume)",
    "smoke": "quick check: the 2-layer SmolLM2, 5 short steps, no eval stage (see below)",
    "log_level": "debug | info | warning: how much DeepSpeed, transformers and lm-eval print",
    "engine": "deepspeed (any ZeRO stage, from the deepspeed: block) or fsdp2 (torchrun)",
    "model.name_or_path": "hub id, local folder, asset:smollm2[:LAYERS] or asset:tiny_moe",
    "model.dtype": "auto (bfloat16 if deepspeed.bf16.enabled), float32 or bfloat16",
    "model.gradient_checkpointing": "recompute activations in backward to save memory",
    "model.partitioned_load": "ZeRO-3/FSDP2: each rank reads only its part of the base "
                              "(false: whole model on every rank first)",
    "model.trainable": "full fine-tuning: regexes over parameter names trained whole (no LoRA)",
    "lora.r": "adapter rank",
    "lora.lora_alpha": "PEFT's scaling numerator (scale = lora_alpha / r)",
    "lora.lora_dropout": "dropout on the adapter input",
    "lora.target_modules": "Linear layer names to adapt (e.g. q_proj,v_proj)",
    "adapter.type": "lora (the lora: section) or PEFT's oft / boft (trained with adamw)",
    "adapter.config": "OFTConfig / BOFTConfig keyword arguments, verbatim",
    "init.method": "loi | zero | random (manifold optimizers); peft | pissa | lora_ga (others)",
    "init.p": "LOI oversampling of its randomized SVD",
    "init.q": "LOI power steps",
    "init.alpha": "LOI scale (null: -0.01/sqrt(r), the paper's LLM setting)",
    "init.batches": "calibration micro-batches of LOI / LoRA-GA (shared out over ranks)",
    "init.niter": "PiSSA randomized-SVD iterations (0: exact SVD)",
    "data.train": "commonsense[:TASK], math, code, a hub set, or a local .json/.jsonl file",
    "data.train_limit": "at most this many training examples (null: all)",
    "data.eval": "eval-loss data (null: data.train's eval split)",
    "data.eval_split": "eval (the dataset's test split) or holdout (kept out of data.train)",
    "data.eval_limit": "eval-loss examples (0: no eval loss)",
    "data.template": "prompt template: chat or alpaca",
    "data.max_length": "tokens per example (longer ones are cut)",
    "data.packing": "pack several examples into one row",
    "optimizer.name": "one of the registry: " + ", ".join(registry.OPTIMIZERS),
    "optimizer.lr": "learning rate (the schedule multiplies it)",
    "optimizer.weight_decay": "decoupled weight decay",
    "optimizer.momentum": "heavy-ball momentum (Riemannion, RiemannSGD, Muon)",
    "optimizer.betas": "Adam betas",
    "optimizer.eps": "Adam epsilon",
    "optimizer.reg": "rprec_adamw damping",
    "optimizer.options": "further keyword arguments of the optimizer (checked in preflight)",
    "schedule.type": "linear, cosine or constant after the warm-up",
    "schedule.warmup_ratio": "warm-up as a fraction of the steps",
    "schedule.warmup_steps": "warm-up steps (overrides warmup_ratio)",
    "schedule.min_lr_ratio": "final lr as a fraction of optimizer.lr",
    "train.epochs": "passes over the data when max_steps is null",
    "train.micro_batch_size": "examples per forward pass and rank",
    "train.gradient_accumulation_steps": "micro-batches per step (null: from global_batch_size)",
    "train.global_batch_size": "examples per optimizer step over all ranks",
    "train.gradient_clipping": "global gradient-norm clip (0: off)",
    "train.eval_every": "eval loss every N steps (0: at the end only)",
    "train.save_every": "checkpoint every N steps (0: none)",
    "train.keep_last": "complete checkpoints kept",
    "train.log_every": "a metrics.jsonl line every N steps",
    "train.skip_nonfinite_steps": "non-finite steps tolerated when the engine skipped them "
                                  "(null: 0 in fp32, 3 in bf16/fp16)",
    "train.verify_checkpoints": "checksum or size: how resume checks checkpoint files",
    "eval_after.suite": "commonsense, math or code: the eval stage after training (null: off)",
    "eval_after.limit": "documents per task of the eval stage",
    "eval_after.tasks": "a subset of the suite's lm-eval tasks (null: all)",
    "logging.tensorboard": "TensorBoard event files of the metrics under output_dir/tensorboard/",
    "logging.wandb": "also log to Weights & Biases (needs wandb installed)",
    "logging.wandb_project": "W&B project name",
    "logging.wandb_mode": "W&B mode: online, offline or disabled (null: wandb's own default)",
    "memory.check": "refuse a recipe whose memory estimate (printed before loading) exceeds the "
                    "limits (false: print it only)",
    "memory.device_gib": "per-rank GPU memory to plan for (null: this GPU's free memory)",
    "memory.host_gib": "host memory per node to plan for (null: MemAvailable of /proc/meminfo)",
    # The recipe's `deepspeed:` section (a key of the schema, not an engine switch).
    "deepspeed": "the DeepSpeed config, verbatim (checked against DeepSpeed's schema)",
}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def schema_keys(cls: type = Recipe, prefix: str = "") -> list[tuple[str, Any, type]]:
    """``(dotted key, default, section class)`` of every leaf key of the recipe schema."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append((f"{prefix}{f.name}", _default(f), cls))
    return keys


def help_text() -> str:
    """The driver's ``--help``."""
    lines = ["usage: python -m riemann_zero.train RECIPE.yaml [dotted.key=value ...]",
             "",
             "Fine-tunes a model with LoRA as the recipe says, then (eval_after.suite) scores it.",
             "Recipes: recipes/*.yaml (the first line of each is its launch command). Any key",
             "below can be set in the YAML or overridden as dotted.key=value, e.g.",
             "  python -m riemann_zero.train recipes/smollm2_commonsense.yaml smoke=true "
             "output_dir=/tmp/smoke",
             "  python -m riemann_zero.train recipes/smollm2_commonsense.yaml max_steps=3 "
             "eval_after=null output_dir=/tmp/x",
             "Docs: README.md (Training with recipes), launch/README.md (launchers, resuming)."]
    section = None
    keys = schema_keys()
    width = max(len(k) for k, _, _ in keys) + 2
    for key, default, cls in keys:
        head = key.split(".")[0] if "." in key else "(top level)"
        if head != section:
            section = head
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls is not Recipe else ""
            lines += ["", f"{section}:" + (f"  {doc}" if doc else "")]
        lines.append(f"  {key:<{width}}{MEANINGS[key]}  [default: {default!r}]")
    lines += ["", "smoke=true sets (keys also given on the command line keep their value): "
              + " ".join(SMOKE)]
    return "\n".join(lines)
