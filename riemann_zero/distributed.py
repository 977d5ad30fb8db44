"""Where each adapter's rows live on this rank, and which collective sums the small Grams.

The manifold optimizers see an adapter only through a *shards* object:

- ``read(ad, state)`` → (B, gB, Aᵀ, gAᵀ): this rank's rows of lora_B = [Z | U] (m_loc × 2r) and of
  lora_Aᵀ = [V | K] (n_loc × 2r) as fp32/fp64 master values, with their gradients (zeros if none);
- ``write(ad, state, B, Aᵀ)``: store new rows (and refresh low-precision model copies);
- ``reduce_m`` / ``reduce_n``: sum a small tensor over the ranks holding m-side / n-side rows
  (``None`` = this rank holds all rows);
- ``comm``: bytes sent by those collectives, by collective, for accounting.

With one process (or DDP, where each rank holds whole replicas and gradients are already averaged)
``LocalShards`` holds everything and every reduction is the identity: the same optimizer code runs
for 1..N ranks.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from .layout import Adapter

__all__ = ["LocalShards", "resolve_shards"]

_MASTER_DTYPES = (torch.float32, torch.float64)


class LocalShards:
    """All rows on this process; low-precision (bf16/fp16) parameters get fp32 master copies."""

    reduce_m = None
    reduce_n = None

    def __init__(self) -> None:
        self.comm: Counter[str] = Counter()

    @staticmethod
    def _master(p: Tensor, state: dict, key: str, transpose: bool) -> Tensor:
        if p.dtype in _MASTER_DTYPES:
            return p.mT if transpose else p
        if key not in state:
            value = p.detach().float()
            state[key] = (value.mT if transpose else value).contiguous()
        return state[key]

    @staticmethod
    def _grad(p: Tensor, like: Tensor, transpose: bool) -> Tensor:
        g = p.grad
        if g is None:  # no gradient reached this adapter: a zero gradient, not a skipped step
            return torch.zeros_like(like)
        g = g.mT if transpose else g
        return g.to(like.dtype)

    def read(self, ad: Adapter, state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b = self._master(ad.lora_B, state, "master_B", transpose=False)
        at = self._master(ad.lora_A, state, "master_At", transpose=True)
        return b, self._grad(ad.lora_B, b, False), at, self._grad(ad.lora_A, at, True)

    def write(self, ad: Adapter, state: dict, b: Tensor, at: Tensor) -> None:
        if "master_B" in state:
            state["master_B"].copy_(b)
        if "master_At" in state:
            state["master_At"].copy_(at)
        ad.lora_B.copy_(b)
        ad.lora_A.copy_(at.mT)


def resolve_shards(adapters: list[Adapter], param_groups: list[dict]):
    """Pick the shard layout from what the parameters look like at the first step."""
    return LocalShards()
