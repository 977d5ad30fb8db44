"""The collectives of the manifold step, each counted in bytes by purpose.

Every collective goes through a :class:`Counting` wrapper (:class:`CountingAllReduce`,
:class:`CountingReduce`, :class:`CountingBroadcast`, :class:`CountingAllToAll`,
:class:`CountingAllGather`), which adds its payload to a ``Counter`` under
``"<collective>.<purpose>"`` before running it. The payload is what this rank passes to the call:
the tensor it reduces or broadcasts, its send buffer for an all-to-all, its own share for an
all-gather. The optimizers report that counter per step (``last_step_comm``) and the training
driver logs it.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Counting", "CountingAllReduce", "CountingReduce", "CountingBroadcast",
           "CountingAllToAll", "CountingAllGather", "sketch_reduce"]


class Counting(abc.ABC):
    """Runs one collective over ``group``, adding the payload bytes of ``t`` to ``comm[key]``.

    Subclasses only say which collective (:meth:`run`); ``__call__(t, *args)`` passes ``args`` on.
    """

    def __init__(self, comm: Counter, key: str, group=None) -> None:
        self.comm, self.key, self.group = comm, key, group

    def __call__(self, t: Tensor, *args) -> Tensor:
        t = t.contiguous()
        self.comm[self.key] += t.numel() * t.element_size()
        return self.run(t, *args)

    @abc.abstractmethod
    def run(self, t: Tensor, *args) -> Tensor:
        """The collective itself, on the contiguous ``t``."""


class CountingAllReduce(Counting):
    """``t ↦ all_reduce(t)`` (sum, in place)."""

    def run(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, group=self.group)
        return t


class CountingReduce(Counting):
    """``(t, dst) ↦ reduce(t, dst)``: sum onto the global rank ``dst`` (valid there only)."""

    def run(self, t: Tensor, dst: int) -> Tensor:
        dist.reduce(t, dst=dst, group=self.group)
        return t


class CountingBroadcast(Counting):
    """``(t, src) ↦ broadcast(t, src)``: afterwards every rank holds the global rank ``src``'s
    values."""

    def run(self, t: Tensor, src: int) -> Tensor:
        dist.broadcast(t, src=src, group=self.group)
        return t


class CountingAllToAll(Counting):
    """``(send, recv_splits, send_splits) ↦ recv``: one ``all_to_all_single`` with variable
    splits; ``send`` is grouped by destination rank (``send_splits[j]`` elements for group rank
    j), the result by source rank (``recv_splits[j]`` elements from group rank j)."""

    def run(self, t: Tensor, recv_splits: list[int], send_splits: list[int]) -> Tensor:
        out = t.new_empty(sum(recv_splits))
        dist.all_to_all_single(out, t, recv_splits, send_splits, group=self.group)
        return out


class CountingAllGather(Counting):
    """``t ↦`` the (world, *t.shape) stack of every group rank's ``t``."""

    def run(self, t: Tensor) -> Tensor:
        parts = [t.new_empty(t.shape) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts)


def sketch_reduce(group=None, comm: Counter | None = None) -> Callable[[Tensor], Tensor] | None:
    """The in-place sum of LOI sketches over data-parallel ranks (``None`` without a process group).

    Pass it as ``loi_init(..., reduce=sketch_reduce())``: each rank sketches its own calibration
    batches; the sums are identical on every rank, so every rank derives the same ΔW₀.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None
    return CountingAllReduce(Counter() if comm is None else comm, "all_reduce.loi_sketch", group)
