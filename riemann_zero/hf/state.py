"""Accelerate's distributed state for CPU processes (gloo), completed where transformers and
accelerate leave it wrong, and FSDP2 sharding with the manifold placement.

Two gaps in transformers 5.2x / accelerate 1.15 on CPU processes:

- DeepSpeed. ``TrainingArguments(deepspeed=...)`` builds accelerate's ``PartialState`` without a
  backend (transformers ``training_args.py``, ``_setup_devices``: the DeepSpeed branch passes only
  ``use_deepspeed`` and ``timeout``, never ``ddp_backend``), and accelerate's
  ``PartialState._prepare_backend`` knows no backend for a process without an accelerator unless
  ``cpu=True``. DeepSpeed's ``init_distributed`` still creates the gloo group of all ranks, but
  the state then applies "no backend == no distributed training": ``num_processes = 1`` and
  ``process_index = 0`` on every rank, so each rank reads the whole dataset, every rank is the
  main process, and the DeepSpeed config's batch sizes are filled in for one process.
  :func:`complete_deepspeed_state` fills the state in from the process group that exists and
  re-derives ``TrainingArguments``' DeepSpeed config for the real world size.
- FSDP. ``AcceleratorState`` turns a multi-process state into FSDP only for accelerator devices
  (accelerate ``state.py``: the ``elif self.distributed_type in [MULTI_GPU, ...]`` list lacks
  ``MULTI_CPU``), so ``TrainingArguments(fsdp=..., use_cpu=True)``, or ``accelerate launch --cpu
  --use_fsdp``, drops the FSDP plugin and the Trainer wraps the model in DDP.
  :func:`complete_fsdp_state` sets the FSDP type and plugin as that branch does for GPUs.

:func:`check_world` makes a silent single-rank fallback impossible: a launcher that started
``WORLD_SIZE`` processes and a Trainer that sees fewer is refused.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from riemann_zero.adapters.placement import fsdp_placement

__all__ = ["complete_deepspeed_state", "complete_fsdp_state", "check_world", "is_fsdp2",
           "shard_fsdp2"]


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def complete_deepspeed_state(args) -> None:
    """Give ``TrainingArguments(deepspeed=...)`` on CPU processes the world DeepSpeed set up
    (see the module docstring); a no-op wherever the state is already right."""
    from accelerate import PartialState

    world = _launched_world()
    state = getattr(args, "distributed_state", None)
    if (not getattr(args, "deepspeed", None) or world <= 1 or state is None
            or state.num_processes == world or state.backend is not None
            or not dist.is_initialized() or dist.get_world_size() != world):
        return
    PartialState._shared_state.update(
        backend=dist.get_backend(), num_processes=world, process_index=dist.get_rank(),
        local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    # TrainingArguments filled the config's "auto" batch sizes for one process: redo that step
    # (its __post_init__ step 12) from the user's untouched `deepspeed` value.
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


def complete_fsdp_state(trainer) -> None:
    """Make the Trainer's accelerator FSDP on CPU processes when ``TrainingArguments`` asked for
    FSDP (see the module docstring); a no-op on GPUs and without FSDP."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    kwargs = trainer.args.fsdp_plugin_args  # TrainingArguments(fsdp=...), else the launcher's
    asked = kwargs is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if not asked or trainer.is_fsdp_enabled or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**(kwargs or {}))  # reads accelerate's FSDP_* vars
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def check_world(accelerator) -> None:
    """One ``ValueError`` line when the launcher started more processes than the Trainer sees."""
    world = _launched_world()
    if world > 1 and accelerator.num_processes != world:
        raise ValueError(
            f"WORLD_SIZE={world} but the Trainer's process group has "
            f"{accelerator.num_processes} process(es), so each rank would train alone on all the "
            f"data; on CPU processes pass TrainingArguments(use_cpu=True) (DDP, FSDP) or set "
            f"DS_ACCELERATOR=cpu for TrainingArguments(deepspeed=...)")


def is_fsdp2(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return bool(trainer.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) == 2)


@contextmanager
def _placement(fn):
    """accelerate's ``fsdp2_prepare_model`` calls ``fully_shard`` with the plugin's options and
    no ``shard_placement_fn``: add ours for the duration of that call."""
    import torch.distributed.fsdp as fsdp

    original = fsdp.fully_shard

    def fully_shard(module, **kwargs):
        return original(module, shard_placement_fn=fn, **kwargs)

    fsdp.fully_shard = fully_shard
    try:
        yield
    finally:
        fsdp.fully_shard = original


def shard_fsdp2(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place with accelerate's FSDP2 preparation (the plugin's wrap policy,
    resharding, offload, mixed precision), lora_A of every manifold adapter on ``Shard(1)``
    (:func:`riemann_zero.fsdp_placement`). The manifold optimizer is then built on the sharded
    parameters; accelerate's own ``prepare(model, optimizer)`` finds the model sharded and maps
    the optimizer's parameters onto themselves."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return model
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("riemann_zero.hf needs the whole model on every rank before FSDP2 "
                         "shards it (conversion, LOI), but some weights are on the meta device; "
                         "set fsdp_config cpu_ram_efficient_loading=false "
                         "(FSDP_CPU_RAM_EFFICIENT_LOADING=false)")
    # Every rank holds the whole model already, so accelerate's cpu_ram_efficient_loading
    # (`accelerate launch --use_fsdp` turns it on) would only move it to meta and broadcast it back
    # from rank 0, and its loader expects every state-dict entry to be a DTensor, which LOI's
    # persistent ΔW₀ buffers are not: shard the weights where they are.
    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False
    with _placement(fsdp_placement(model)):
        return fsdp2_prepare_model(accelerator, model)
