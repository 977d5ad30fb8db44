"""How the driver creates and loads the base model: three load kinds, each engine choosing among
them (:meth:`~riemann_zero.train.engines.base.Engine.load`; the name is ``Plan.load_mode``).

- :data:`WHOLE` (``"whole"``): transformers' ``from_pretrained`` on every rank, then the engine
  partitions it (ZeRO-0/1/2, ``model.partitioned_load: false``, and the starts that need whole
  base weights: PiSSA, LoRA-GA, StelLA's preparation, PEFT's OFT/BOFT, full fine-tuning);
- :data:`ZERO_INIT` (``"zero3"``): the model is built inside DeepSpeed's ``zero.Init`` (each
  weight is partitioned as its module is created, never initialised) and each rank reads only its
  chunk of every tensor from the safetensors files (:mod:`riemann_zero.sharding.load`). The
  adapters are created whole (they are small) and partitioned by ``deepspeed.initialize``; LOI
  runs afterwards through the engine's gather hooks;
- :data:`META` (``"fsdp2"``): the model is built on the meta device (buffers such as the rotary
  frequencies are computed for real on the CPU), ``fully_shard`` lays it out, ``to_empty`` gives
  each rank storage for its shards only, and each rank reads its rows (:func:`materialize`);
  adapters are initialised and LOI runs on the sharded model.

No rank ever holds the whole base in the last two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from riemann_zero.sharding.load import checkpoint_files, load_local_parts
from riemann_zero.train.recipe import Recipe

__all__ = ["Load", "WHOLE", "ZERO_INIT", "META", "load_kind", "model_dtype", "create_base",
           "materialize"]

# (model path, the engine's complete DeepSpeed config, dtype, device) -> (base, prefixes)
Creator = Callable[[str, dict, torch.dtype, Any], tuple[Any, dict[int, str]]]


@dataclass(frozen=True)
class Load:
    """One way of creating the base model.

    Attributes:
        name: the value of ``Plan.load_mode`` and of run.json's ``load``.
        says: how the loading line describes it.
        partitioned: no rank holds the whole base (the adapters' start waits for the engine).
        after_sharding: the weights are read after the engine laid the model out
            (:func:`materialize`), and the adapters get their values only then.
        create: builds the base; returns it and {id(module): its checkpoint name} (the names are
            what :func:`materialize` reads, empty where nothing is left to read).
    """

    name: str
    says: str
    partitioned: bool
    after_sharding: bool
    create: Creator


def _from_pretrained(path: str, ds_config: dict, dtype: torch.dtype, device: Any):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device), {}


def _under_zero_init(path: str, ds_config: dict, dtype: torch.dtype, device: Any):
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    checkpoint_files(path)  # a folder without safetensors fails here, before any work
    config = AutoConfig.from_pretrained(path)
    # DeepSpeed 0.19 reads an explicit fp32 ``dtype`` as bf16 on accelerators without fp16
    # (``dtype or fp16 if … else bf16``); without one it takes the config's precision, which
    # for fp32 is what we want (and the engine casts to bf16 anyway when bf16 is on).
    init_dtype = None if dtype == torch.float32 else dtype
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=init_dtype):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.tie_weights()  # no_init_weights skips init_weights, which is what ties them
    load_local_parts(base, path)
    return base, {}


def _on_meta(path: str, ds_config: dict, dtype: torch.dtype, device: Any):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint_files(path)  # a folder without safetensors fails here, before any work
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.tie_weights()
    prefixes = {id(m): name for name, m in base.named_modules(remove_duplicate=False)}
    return base, prefixes


WHOLE = Load("whole", "whole on every rank", partitioned=False, after_sharding=False,
             create=_from_pretrained)
ZERO_INIT = Load("zero3", "partitioned (ZeRO-3 zero.Init)", partitioned=True,
                 after_sharding=False, create=_under_zero_init)
META = Load("fsdp2", "on the meta device, loaded after sharding", partitioned=True,
            after_sharding=True, create=_on_meta)
_LOADS = {load.name: load for load in (WHOLE, ZERO_INIT, META)}


def load_kind(name: str) -> Load:
    """The load kind called ``name`` (a ``Plan.load_mode``)."""
    if name not in _LOADS:
        raise ValueError(f"load mode must be one of {sorted(_LOADS)}, but got {name!r}")
    return _LOADS[name]


def model_dtype(recipe: Recipe) -> torch.dtype:
    """The recipe's ``model.dtype`` (``auto``: bfloat16 when DeepSpeed's bf16 is on)."""
    bf16 = bool(recipe.deepspeed.get("bf16", {}).get("enabled", False))
    return {"auto": torch.bfloat16 if bf16 else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[recipe.model.dtype]


def create_base(plan: Any, mode: str, dtype: torch.dtype, device: Any
                ) -> tuple[Any, dict[int, str]]:
    """The base model of ``plan`` (its ``model_path`` and ``deepspeed`` config) created as the
    load mode ``mode`` says, and {id(module): its checkpoint name} (see :class:`Load`)."""
    return load_kind(mode).create(plan.model_path, plan.deepspeed, dtype, device)


@torch.no_grad()
def materialize(model: torch.nn.Module, plan: Any, prefixes: dict[int, str],
                device: Any) -> None:
    """After ``fully_shard`` of a meta-device model: storage for this rank's shards, the buffers
    as computed at construction, and this rank's rows of every base weight from the checkpoint
    (adapters are left for their initialisation)."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    load_local_parts(model, plan.model_path, prefixes)
