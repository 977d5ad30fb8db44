"""How the driver creates and loads the base model (the mode is ``Plan.load_mode``, decided in
preflight by :func:`~riemann_zero.train.preflight.load_mode`).

- ``"whole"``: transformers' ``from_pretrained`` on every rank, then the engine partitions it
  (ZeRO-0/1/2, ``model.partitioned_load: false``, and the starts that need whole base
  weights: PiSSA, LoRA-GA, StelLA's preparation, PEFT's OFT/BOFT, full fine-tuning);
- ``"zero3"``: the model is built inside DeepSpeed's ``zero.Init`` (each weight is partitioned as
  its module is created, never initialised) and each rank reads only its chunk of every tensor
  from the safetensors files (:mod:`riemann_zero.sharding.load`). The adapters are created whole
  (they are small) and partitioned by ``deepspeed.initialize``; LOI runs afterwards through the
  engine's gather hooks;
- ``"fsdp2"``: the model is built on the meta device (buffers such as the rotary frequencies are
  computed for real on the CPU), ``fully_shard`` lays it out, ``to_empty`` gives each rank storage
  for its shards only, and each rank reads its rows; adapters are initialised and LOI runs on the
  sharded model.

No rank ever holds the whole base in the last two.
"""

from __future__ import annotations

from typing import Any

import torch

from riemann_zero.sharding.load import checkpoint_files, load_local_parts
from riemann_zero.train.preflight import Plan
from riemann_zero.train.recipe import Recipe

__all__ = ["model_dtype", "create_base", "materialize"]


def model_dtype(recipe: Recipe) -> torch.dtype:
    """The recipe's ``model.dtype`` (``auto``: bfloat16 when DeepSpeed's bf16 is on)."""
    bf16 = bool(recipe.deepspeed.get("bf16", {}).get("enabled", False))
    return {"auto": torch.bfloat16 if bf16 else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[recipe.model.dtype]


def create_base(plan: Plan, mode: str, dtype: torch.dtype, device: Any
                ) -> tuple[Any, dict[int, str]]:
    """The base model, loaded (``whole``, ``zero3``) or on the meta device (``fsdp2``: call
    :func:`materialize` after ``fully_shard``), and {id(module): its checkpoint name}."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if mode == "whole":
        base = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype).to(device)
        return base, {}
    checkpoint_files(plan.model_path)  # a folder without safetensors fails here, before any work
    config = AutoConfig.from_pretrained(plan.model_path)
    if mode == "zero3":
        import deepspeed
        from transformers.initialization import no_init_weights

        # DeepSpeed 0.19 reads an explicit fp32 ``dtype`` as bf16 on accelerators without fp16
        # (``dtype or fp16 if … else bf16``); without one it takes the config's precision, which
        # for fp32 is what we want (and the engine casts to bf16 anyway when bf16 is on).
        init_dtype = None if dtype == torch.float32 else dtype
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=plan.deepspeed,
                                                    dtype=init_dtype):
            base = AutoModelForCausalLM.from_config(config, dtype=dtype)
        base.tie_weights()  # no_init_weights skips init_weights, which is what ties them
        load_local_parts(base, plan.model_path)
        return base, {}
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.tie_weights()
    prefixes = {id(m): name for name, m in base.named_modules(remove_duplicate=False)}
    return base, prefixes


@torch.no_grad()
def materialize(model: torch.nn.Module, plan: Plan, prefixes: dict[int, str],
                device: Any) -> None:
    """After ``fully_shard`` of a meta-device model: storage for this rank's shards, the buffers
    as computed at construction, and this rank's rows of every base weight from the checkpoint
    (adapters are left for their initialisation)."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    load_local_parts(model, plan.model_path, prefixes)
