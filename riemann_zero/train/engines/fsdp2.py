"""FSDP2: ``fully_shard`` on every decoder layer, then on the whole model (started by torchrun),
with manual gradient accumulation and clipping. Manifold adapters get
:func:`~riemann_zero.adapters.placement.fsdp_placement` (lora_A on ``Shard(1)``), so the manifold
step all-reduces only small Grams. The base is created on the meta device and each rank reads its
rows after sharding; checkpoints go through ``torch.distributed.checkpoint``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from riemann_zero.adapters.placement import fsdp_placement
from riemann_zero.optim import registry
from riemann_zero.train.engines.base import (
    Description,
    Engine,
    MemoryFacts,
    OptimizerFactory,
    StateIO,
    manifold_state,
)
from riemann_zero.train.engines.loading import META, Load

__all__ = ["FSDP2Engine"]


class FSDP2Engine(Engine):
    """FSDP2 (``fully_shard``) with manual gradient accumulation and clipping."""

    @classmethod
    def describe(cls, config: dict[str, Any], *, bf16: bool) -> Description:
        return Description(where="FSDP2", whole=False, copies_back=False)

    def partitioned_load(self) -> Load:
        return META

    def memory_facts(self) -> MemoryFacts:
        return MemoryFacts(partitions_base=True, shards_state=True, master_copy=False)

    def gathered_values(self, counts: dict[str, int]) -> int:
        # Two decoder layers (current and prefetched) plus the root's embedding, norm and head.
        return 2 * counts["layer"] + counts["root"]

    def gradient_bytes(self, n_train: int, width: int, world: int) -> int:
        return n_train * width // world

    def init_distributed(self, backend: str) -> None:
        dist.init_process_group(backend)

    def start(self, model: torch.nn.Module, make_optimizer: OptimizerFactory,
              lr_fn: Callable[[int], float], *, config: dict[str, Any], grad_accum: int,
              device: torch.device) -> None:
        from torch.distributed.fsdp import fully_shard

        # Manifold adapters: lora_A on Shard(1), so the n side is row-sharded like the m side.
        manifold = registry.spec(self.recipe.optimizer.name).layout == "manifold"
        place = {"shard_placement_fn": fsdp_placement(model)} if manifold else {}
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer, **place)
        fully_shard(model, **place)
        self.module = model
        self.optimizer = make_optimizer(model)
        self.client_optimizer = self.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn)
        self.grad_accum, self.device = grad_accum, device
        self.clip = self.recipe.train.gradient_clipping
        self.micro = 0
        self.last_grad_norm: float | None = None

    def __call__(self, **batch):
        last = (self.micro + 1) % self.grad_accum == 0
        self.module.set_requires_gradient_sync(last)
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.grad_accum:
            return
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.grad is not None], self.clip)
            self.last_grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor")
                                        else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last optimizer step (None without clipping)."""
        return self.last_grad_norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))

    def io(self, exclude_frozen: bool) -> StateIO:
        # Manifold optimizers stay out of torch.distributed.checkpoint's optimizer path: it keeps
        # only torch.optim's state/param_groups (dropping the per-adapter momentum and masters)
        # and, finding torch.optim's state empty, runs a dummy zero-lr step() to initialise it,
        # which would decay the momentum. Their own state_dict() (this rank's rows) is saved per
        # rank instead; the model goes through DCP.
        if manifold_state(self.optimizer):
            return self._model_io(exclude_frozen)
        return self._dcp_io(exclude_frozen)

    def _options(self, exclude_frozen: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Frozen base weights are rebuilt by the deterministic initialisation: leave them out.
        return StateDictOptions(ignore_frozen_params=exclude_frozen, strict=not exclude_frozen)

    def _save_scheduler(self, directory: Path) -> None:
        if dist.get_rank() == 0:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def _model_io(self, exclude_frozen: bool) -> StateIO:
        """The model through DCP, the optimizer's own state_dict() per rank."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )

        opts = self._options(exclude_frozen)
        per_rank = f"optimizer_rank{dist.get_rank()}.pt"

        def write(directory: Path) -> None:
            dcp.save({"model": get_model_state_dict(self.module, options=opts)},
                     checkpoint_id=str(directory))
            torch.save(self.optimizer.state_dict(), directory / per_rank)
            self._save_scheduler(directory)

        def read(directory: Path) -> None:
            state = {"model": get_model_state_dict(self.module, options=opts)}
            dcp.load(state, checkpoint_id=str(directory))
            set_model_state_dict(self.module, state["model"], options=opts)
            self.optimizer.load_state_dict(torch.load(directory / per_rank, weights_only=False))
            self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt"))

        return write, read

    def _dcp_io(self, exclude_frozen: bool) -> StateIO:
        """Model and torch.optim optimizer together through DCP."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        opts = self._options(exclude_frozen)

        def write(directory: Path) -> None:
            msd, osd = get_state_dict(self.module, self.optimizer, options=opts)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))
            self._save_scheduler(directory)

        def read(directory: Path) -> None:
            msd, osd = get_state_dict(self.module, self.optimizer, options=opts)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(directory))
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=opts)
            self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt"))

        return write, read
