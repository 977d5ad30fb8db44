"""The two engines of the driver, behind the same calls: forward (``__call__``), ``backward``,
``step`` at every micro-batch (optimizer and scheduler at accumulation boundaries only),
``train``, ``lr`` and ``io`` (checkpoint writer and reader).

- :class:`DeepSpeedEngine`: ``deepspeed.initialize`` with the client optimizer, any ZeRO stage,
  from the recipe's ``deepspeed:`` block;
- :class:`FSDP2Engine`: ``fully_shard`` on every decoder layer, then on the whole model (started
  by torchrun); manifold adapters get :func:`~riemann_zero.adapters.placement.fsdp_placement`
  (lora_A on ``Shard(1)``), so the manifold step all-reduces only small Grams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from riemann_zero.adapters.placement import fsdp_placement
from riemann_zero.train import checkpoint as ckpt

__all__ = ["DeepSpeedEngine", "FSDP2Engine"]


class DeepSpeedEngine:
    """``deepspeed.initialize`` with the client optimizer and a LambdaLR on its param groups."""

    def __init__(self, model, optimizer, lr_fn, ds_config: dict[str, Any]) -> None:
        import deepspeed

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.client_optimizer = optimizer
        self.module = self.engine.module
        self.device = self.engine.device

    def __call__(self, **batch):
        return self.engine(**batch)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # steps optimizer and scheduler at accumulation boundaries only

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def lr(self) -> float:
        return float(self.client_optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last optimizer step (None where DeepSpeed computed
        none)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def io(self, exclude_frozen: bool):
        return ckpt.deepspeed_io(self.engine, exclude_frozen=exclude_frozen)


class FSDP2Engine:
    """FSDP2 (``fully_shard``) with manual gradient accumulation and clipping."""

    def __init__(self, model, make_optimizer, lr_fn, grad_accum: int, clip: float,
                 device: torch.device, *, manifold: bool) -> None:
        from torch.distributed.fsdp import fully_shard

        # Manifold adapters: lora_A on Shard(1), so the n side is row-sharded like the m side.
        place = {"shard_placement_fn": fsdp_placement(model)} if manifold else {}
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer, **place)
        fully_shard(model, **place)
        self.module = model
        self.optimizer = make_optimizer(model)
        self.client_optimizer = self.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn)
        self.grad_accum, self.clip, self.device = grad_accum, clip, device
        self.micro = 0
        self.last_grad_norm: float | None = None

    def __call__(self, **batch):
        last = (self.micro + 1) % self.grad_accum == 0
        self.module.set_requires_gradient_sync(last)
        return self.module(**batch)

    def backward(self, loss) -> None:
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

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last optimizer step (None without clipping)."""
        return self.last_grad_norm

    def io(self, exclude_frozen: bool):
        import torch.distributed.checkpoint as dcp

        # Manifold optimizers stay out of torch.distributed.checkpoint's optimizer path: it keeps
        # only torch.optim's state/param_groups (dropping the per-adapter momentum and masters)
        # and, finding torch.optim's state empty, runs a dummy zero-lr step() to initialise it,
        # which would decay the momentum. Their own state_dict() (this rank's rows) is saved per
        # rank instead; the model goes through DCP.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        # Frozen base weights are rebuilt by the deterministic initialisation: leave them out.
        opts = StateDictOptions(ignore_frozen_params=exclude_frozen, strict=not exclude_frozen)

        manifold = hasattr(self.optimizer, "adapter_state_dict") or hasattr(
            self.optimizer, "tensor_state_dict")  # Tensorion's state is keyed by tensor name
        per_rank = f"optimizer_rank{dist.get_rank()}.pt"

        def write(directory: Path) -> None:
            if manifold:
                dcp.save({"model": get_model_state_dict(self.module, options=opts)},
                         checkpoint_id=str(directory))
                torch.save(self.optimizer.state_dict(), directory / per_rank)
            else:
                msd, osd = get_state_dict(self.module, self.optimizer, options=opts)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))
            if dist.get_rank() == 0:
                torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

        def read(directory: Path) -> None:
            if manifold:
                state = {"model": get_model_state_dict(self.module, options=opts)}
                dcp.load(state, checkpoint_id=str(directory))
                set_model_state_dict(self.module, state["model"], options=opts)
                self.optimizer.load_state_dict(
                    torch.load(directory / per_rank, weights_only=False))
            else:
                msd, osd = get_state_dict(self.module, self.optimizer, options=opts)
                state = {"model": msd, "optim": osd}
                dcp.load(state, checkpoint_id=str(directory))
                set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optim"], options=opts)
            self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt"))

        return write, read
