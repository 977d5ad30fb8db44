"""Where FSDP2 should put each adapter factor so that the manifold step needs only small Grams."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from riemann_zero.adapters.layout import find_adapters

__all__ = ["fsdp_placement"]


def fsdp_placement(model: torch.nn.Module) -> Callable[[Tensor], object]:
    """A ``shard_placement_fn`` for ``fully_shard``: lora_A (2r×n) of every manifold adapter on
    ``Shard(1)`` (split along n, so Aᵀ is row-sharded) where the world size divides n, everything
    else FSDP2's default ``Shard(0)``. Build it once from the PEFT model, after
    ``init_process_group`` and before sharding."""
    from torch.distributed.tensor import Shard

    world = dist.get_world_size() if dist.is_initialized() else 1
    # FSDP2 cannot shard dim 1 unevenly: where world ∤ n, keep Shard(0) (Aᵀ is then gathered).
    lora_a = {id(ad.lora_A) for ad in find_adapters(model) if ad.n % world == 0}
    return lambda p: Shard(1) if id(p) in lora_a else None
