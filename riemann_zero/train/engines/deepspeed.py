"""DeepSpeed: ``deepspeed.initialize`` with the client optimizer, any ZeRO stage, from the
recipe's ``deepspeed:`` block; its config checked against DeepSpeed's own schema; its
checkpoints through ``engine.save_checkpoint`` / ``load_checkpoint``; under ZeRO-3 the base is
created partitioned inside ``zero.Init``."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from riemann_zero.train.checkpoint import CheckpointError
from riemann_zero.train.engines.base import (
    Description,
    Engine,
    MemoryFacts,
    OptimizerFactory,
    StateIO,
)
from riemann_zero.train.engines.loading import WHOLE, ZERO_INIT, Load
from riemann_zero.train.recipe import RecipeError

__all__ = ["DeepSpeedEngine", "deepspeed_io", "check_deepspeed_config", "zero_stage"]

# DeepSpeed's default ``reduce_bucket_size`` (elements) when the config leaves it out.
_DS_REDUCE_BUCKET = 500_000_000


def _zero(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("zero_optimization", {}) or {}


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it names none)."""
    return int(_zero(config).get("stage", 0))


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with the client optimizer and a LambdaLR on its param groups."""

    @classmethod
    def describe(cls, config: dict[str, Any], *, bf16: bool) -> Description:
        stage = zero_stage(config)
        # ZeRO-0 leaves the parameters whole; its bf16 wrapper copies its masters back.
        return Description(where=f"ZeRO-{stage}", whole=stage == 0,
                           copies_back=bf16 and stage == 0)

    def partitioned_load(self) -> Load:
        return ZERO_INIT if zero_stage(self.recipe.deepspeed) == 3 else WHOLE

    def check(self, config: dict[str, Any]) -> None:
        check_deepspeed_config(config)

    def memory_facts(self) -> MemoryFacts:
        stage, zero = zero_stage(self.recipe.deepspeed), _zero(self.recipe.deepspeed)
        return MemoryFacts(
            partitions_base=stage == 3, shards_state=stage >= 1, master_copy=stage >= 1,
            offload_optimizer=str((zero.get("offload_optimizer") or {}).get("device",
                                                                            "none")) == "cpu",
            offload_param=str((zero.get("offload_param") or {}).get("device", "none")) == "cpu")

    def gathered_values(self, counts: dict[str, int]) -> int:
        # ZeRO-3: two of the largest of a decoder layer, the embedding and the head.
        return 2 * max(counts["layer"], counts["embed"], counts["head"])

    def gradient_bytes(self, n_train: int, width: int, world: int) -> int:
        stage = zero_stage(self.recipe.deepspeed)
        if stage in (2, 3):  # fp32 partitions plus one reduce bucket in the model dtype
            bucket = int(_zero(self.recipe.deepspeed).get("reduce_bucket_size",
                                                           _DS_REDUCE_BUCKET))
            return n_train * 4 // world + min(n_train, bucket) * width
        if stage == 1:
            return n_train * width + n_train * 4 // world
        return n_train * width

    def init_distributed(self, backend: str) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)

    def prepare_full_finetune(self, base: torch.nn.Module) -> None:
        if zero_stage(self.recipe.deepspeed) == 3:
            # ZeRO-3 re-gathers parameters for backward from hooks on module inputs that require
            # grad; with everything upstream of the first trained tensor frozen there are none,
            # and backward meets released (empty) weights. Make the embedding output require it.
            base.enable_input_require_grads()

    def start(self, model: torch.nn.Module, make_optimizer: OptimizerFactory,
              lr_fn: Callable[[int], float], *, config: dict[str, Any], grad_accum: int,
              device: torch.device) -> None:
        import deepspeed

        optimizer = make_optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=False)
        self.client_optimizer = optimizer
        self.module = self.engine.module
        self.device = self.engine.device

    def __call__(self, **batch):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # steps optimizer and scheduler at accumulation boundaries only

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last optimizer step (None where DeepSpeed computed
        none)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def io(self, exclude_frozen: bool) -> StateIO:
        return deepspeed_io(self.engine, exclude_frozen=exclude_frozen)


def _frozen_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of frozen parameters, tied aliases included (``lm_head.weight`` tied to
    the embedding is not in ``named_parameters()``, so DeepSpeed's frozen filter keeps it)."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


# What DeepSpeed's ``_copy_recovery_script`` writes beside a ZeRO checkpoint.
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def deepspeed_io(engine: Any, *, exclude_frozen: bool) -> StateIO:
    """Writer and reader of a DeepSpeed engine's state (model incl. buffers, optimizer, scheduler).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine``.
        exclude_frozen: leave frozen base weights (tied aliases too) out of the files. Only
            valid when the driver rebuilds them identically before loading (it re-runs the
            deterministic initialisation, LOI's base-weight shift included); buffers are always
            saved.
    """
    module_state_dict = engine.module_state_dict

    def trainable_state_dict(*args, **kwargs):
        state = module_state_dict(*args, **kwargs)
        for name in _frozen_names(engine.module) if exclude_frozen else ():
            state.pop(name, None)
        return state

    def write(directory: Path) -> None:
        engine.module_state_dict = trainable_state_dict
        try:
            engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False,
                                   exclude_frozen_parameters=exclude_frozen)
        finally:
            del engine.module_state_dict  # back to the class's method
        # Under ZeRO, DeepSpeed's rank 0 copies its recovery scripts into the folder above the
        # checkpoint (the staging folder here), which then never empties: the driver exports
        # the adapter itself, so they are not kept.
        if engine.global_rank == 0:
            for script in RECOVERY_SCRIPTS:
                (directory.parent / script).unlink(missing_ok=True)

    def read(directory: Path) -> None:
        load_path, _ = engine.load_checkpoint(
            str(directory.parent), tag=directory.name, load_module_strict=not exclude_frozen,
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {directory}")

    return write, read


def check_deepspeed_config(cfg: dict[str, Any]) -> None:
    """Validate the DeepSpeed config with DeepSpeed's own schema (pydantic), one line per error."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Reads(dict):  # which top-level keys DeepSpeed looks at; it ignores all others silently
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

    # The global batch is ours (checked above against the world size); DeepSpeed would check it
    # against the world of this not-yet-distributed process.
    probe = {k: v for k, v in copy.deepcopy(cfg).items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(Reads(probe))
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        section = _section_of(cfg, first["loc"])
        key = f"deepspeed.{section + '.' if section else ''}{loc}"
        hint = ""
        if first["type"] == "extra_forbidden":
            known = _model_fields(err.title)
            close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{key}: {first['msg'].lower()}{hint}; see DeepSpeed's config "
                          f"documentation for {err.title}") from None
    except (ValueError, AssertionError, TypeError, KeyError) as err:
        raise RecipeError(f"deepspeed: DeepSpeed rejects this config: {err}") from None
    for key in sorted(set(probe) - seen):
        close = difflib.get_close_matches(key, sorted(seen), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"deepspeed.{key} is not a DeepSpeed config key (DeepSpeed would ignore "
                          f"it silently); {hint}remove or rename it")


def _section_of(cfg: dict[str, Any], loc: tuple) -> str:
    """The dotted path of the sub-block of ``cfg`` that holds the key at ``loc``."""
    def walk(node: Any, path: str) -> str | None:
        if not isinstance(node, dict):
            return None
        if loc and str(loc[0]) in node and path:
            return path
        for k, v in node.items():
            found = walk(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
        return None

    return walk(cfg, "") or ""


def _model_fields(title: str) -> list[str]:
    """Field names (and aliases) of the DeepSpeed pydantic model called ``title``."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo, names = [DeepSpeedConfigModel], []
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__name__ == title:
            for name, f in cls.model_fields.items():
                names += [name] + ([f.alias] if f.alias else [])
    return names
