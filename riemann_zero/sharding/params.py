"""Writing a parameter whatever its layout: assign this rank's part of a full value, refresh the
engine's fp32 master, shift a frozen base weight, gather parameters for reading or writing.

Each helper asks the parameter's layout (:func:`~riemann_zero.sharding.layouts.layout_of`, one
object per engine kind) to do the work. Every write helper writes only this rank's part (and the
engine's fp32 master of it); nothing here gathers an m×n matrix.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor, nn

from riemann_zero.sharding.layouts import Layout, layout_of

__all__ = [
    "AdapterLike",
    "layout_of",
    "local_values",
    "full_tensor",
    "assign",
    "refresh_master",
    "shift_base",
    "gathered",
]


class AdapterLike(Protocol):
    """What the sharding layer needs to know of an adapter (``riemann_zero.Adapter`` is one)."""

    name: str
    r: int
    m: int
    n: int

    @property
    def lora_A(self) -> nn.Parameter: ...  # noqa: N802  (2r, n)

    @property
    def lora_B(self) -> nn.Parameter: ...  # noqa: N802  (m, 2r)


def local_values(p: Tensor) -> Tensor:
    """The values of parameter p stored on this rank (its ZeRO-3 partition, its FSDP2 shard, or
    the whole tensor), without communication."""
    return layout_of(p).values(p)


def full_tensor(p: Tensor) -> Tensor:
    """The whole tensor of a parameter (FSDP2 DTensor → ``full_tensor()``; others as they are).
    Collective for DTensors; ZeRO-3 parameters need :func:`gathered` around it."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


@torch.no_grad()
def assign(p: Tensor, value: Tensor) -> None:
    """Write the full ``value`` (same on every rank) into parameter p, whatever its layout.

    Only this rank's part is written; no communication. ZeRO-3: the ``ds_tensor`` chunk (and the
    optimizer's fp32 master of it, if an engine owns one); FSDP2: the local shard; ZeRO-1/2: the
    module tensor and the fp32 piece of the optimizer; otherwise ``p.copy_``.
    """
    layout_of(p).write(p, value)


@torch.no_grad()
def refresh_master(p: Tensor) -> None:
    """Copy a parameter's module value into the engine's fp32 master of it, after it was written
    outside the optimizer (LOI, re-initialisation): ZeRO-3 ``ds_tensor`` → fp32 partition,
    ZeRO-1/2 ``lp_fragment`` → ``hp_fragment``. A no-op elsewhere."""
    layout_of(p).refresh(p)


@torch.no_grad()
def shift_base(weight: Tensor, b0: Tensor, a0: Tensor) -> None:
    """W ← W − B₀A₀ (fp32) on this rank's part of a frozen (m × n) base weight only; no m×n
    collective.

    Each tensor storing a range [start, stop) of the row-major weight (ZeRO-3: the ``ds_tensor``
    chunk, partial rows at both ends, and the whole weight if DeepSpeed keeps it on every rank;
    FSDP2 ``Shard(0)``: the local rows; otherwise the whole weight) gets only rows
    [start // n, ⌈stop / n⌉) of B₀A₀ formed.
    """
    n = a0.shape[1]
    for start, flat in layout_of(weight).storage(weight):
        stop = start + flat.numel()
        if stop <= start:
            continue
        i0, i1 = start // n, -(-stop // n)
        delta = (b0[i0:i1].float() @ a0.float()).reshape(-1)[start - i0 * n: stop - i0 * n]
        flat.copy_((flat.float() - delta.to(flat.device)).to(flat.dtype))


@contextlib.contextmanager
def gathered(params: list[Tensor], modify: bool = False):
    """Make full parameters visible inside the block under ZeRO-3 (a no-op elsewhere).

    With ``modify=True`` the values written inside the block are re-partitioned on exit (rank 0's
    values win) and copied into the engine's fp32 master partitions, if any. FSDP2 parameters stay
    sharded: write them with :func:`assign` (which handles DTensors).
    """
    by_layout: dict[Layout, list[Tensor]] = {}
    for p in params:
        by_layout.setdefault(layout_of(p), []).append(p)
    with contextlib.ExitStack() as stack:
        for layout, ps in by_layout.items():
            stack.enter_context(layout.visible(ps, modify))
        yield
    if modify:  # an engine's fp32 master copies (ZeRO-1/2/3) must see the new values too
        for p in params:
            refresh_master(p)
