"""The collectives of the manifold step, each counted in bytes by purpose.

Every collective goes through :class:`CountingAllReduce`, which adds its payload (what one rank
passes to the call) to a ``Counter`` under ``"<collective>.<purpose>"``; the optimizers report
that counter per step (``last_step_comm``) and the training driver logs it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CountingAllReduce", "CountingReduce", "CountingBroadcast", "sketch_reduce",
           "gather_lora_a"]


class CountingAllReduce:
    """``t ↦ all_reduce(t)`` over ``group`` (sum), adding the payload bytes to ``comm[key]``."""

    def __init__(self, comm: Counter, key: str, group=None) -> None:
        self.comm, self.key, self.group = comm, key, group

    def __call__(self, t: Tensor) -> Tensor:
        t = t.contiguous()
        self.comm[self.key] += t.numel() * t.element_size()
        dist.all_reduce(t, group=self.group)
        return t


def sketch_reduce(group=None, comm: Counter | None = None) -> Callable[[Tensor], Tensor] | None:
    """The in-place sum of LOI sketches over data-parallel ranks (``None`` without a process group).

    Pass it as ``loi_init(..., reduce=sketch_reduce())``: each rank sketches its own calibration
    batches; the sums are identical on every rank, so every rank derives the same ΔW₀.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None
    return CountingAllReduce(Counter() if comm is None else comm, "all_reduce.loi_sketch", group)


def gather_lora_a(r: int, n: int, start: int, values: Tensor | None, grads: Tensor | None,
                  reduce: Callable[[Tensor], Tensor], *, dtype: torch.dtype,
                  device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Whole Aᵀ = [V | K] (n × 2r) and the gradient of its K block, from flat pieces of lora_A.

    This rank holds elements [start, start + numel) of the row-major flattened lora_A (2r × n)
    as ``values`` (and their gradient ``grads``, or None): a ZeRO flat fragment, or the rows of an
    FSDP2 ``Shard(0)`` shard. One zero-padded all-reduce of 3·r·n numbers completes the values
    and the K block's gradient (r × n: the V block's gradient is used by no algorithm and comes
    back as zeros). Returns (Aᵀ, gradient of Aᵀ), both n × 2r views.
    """
    size = 2 * r * n
    buf = torch.zeros(size + r * n, dtype=dtype, device=device)
    numel = 0 if values is None else values.numel()
    if numel > 0:
        buf[start: start + numel] = values
        lo, hi = max(start, r * n), min(start + numel, size)
        if grads is not None and hi > lo:  # gradient of the K rows (the last r rows of lora_A)
            buf[size + lo - r * n: size + hi - r * n] = grads[lo - start: hi - start]
    buf = reduce(buf)
    a = buf[:size].view(2 * r, n)
    ga = torch.cat([buf.new_zeros(r, n), buf[size:].view(r, n)])
    return a.mT, ga.mT


class CountingReduce:
    """``t ↦ reduce(t, dst)`` (sum onto one rank) over ``group``, counting the payload bytes."""

    def __init__(self, comm: Counter, key: str, group=None) -> None:
        self.comm, self.key, self.group = comm, key, group

    def __call__(self, t: Tensor, dst: int) -> Tensor:
        """``dst`` is a global rank; the sum is valid on ``dst`` only."""
        t = t.contiguous()
        self.comm[self.key] += t.numel() * t.element_size()
        dist.reduce(t, dst=dst, group=self.group)
        return t


class CountingBroadcast:
    """``t ↦ broadcast(t, src)`` over ``group``, counting the payload bytes."""

    def __init__(self, comm: Counter, key: str, group=None) -> None:
        self.comm, self.key, self.group = comm, key, group

    def __call__(self, t: Tensor, src: int) -> Tensor:
        """``src`` is a global rank; afterwards every rank holds its values."""
        t = t.contiguous()
        self.comm[self.key] += t.numel() * t.element_size()
        dist.broadcast(t, src=src, group=self.group)
        return t
