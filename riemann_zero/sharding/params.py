"""How an engine laid a parameter out, which part of it lives on this rank, and how to write it.

Layouts (:func:`layout_of`): ``"local"`` (no engine, DDP, ZeRO-0), ``"zero12"`` (DeepSpeed
ZeRO-1/2: the module tensor is whole, the fp32 master is a fragment ``p._hp_mapping`` of a flat
partition), ``"zero3"`` (``p.ds_id``: rank k holds elements [k·c, (k+1)·c) of the row-major
flattened tensor, c = ``ds_tensor.ds_numel``, the last chunk padded), ``"fsdp2"`` (a DTensor on a
1-D mesh, ``Shard(d)`` with torch.chunk's ceil-sized pieces).

Every write helper writes only this rank's part (and the engine's fp32 master of it); nothing
here gathers an m×n matrix.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "AdapterLike",
    "is_dtensor",
    "layout_of",
    "dtensor_rows",
    "zero3_chunk",
    "local_values",
    "full_tensor",
    "assign",
    "refresh_master",
    "shift_base",
    "gathered",
    "held_whole",
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


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and their gradients)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def layout_of(p: Tensor) -> str:
    """``"zero3"``, ``"zero12"``, ``"fsdp2"`` or ``"local"``: how an engine laid out parameter p."""
    if hasattr(p, "ds_id"):
        return "zero3"
    if hasattr(p, "_hp_mapping"):
        return "zero12"
    if is_dtensor(p):
        return "fsdp2"
    return "local"


def dtensor_rows(full_rows: int, p: Tensor) -> slice:
    """Indices along the sharded dim of a ``Shard(d)`` DTensor held here (torch.chunk semantics:
    ceil-sized pieces, the tail possibly empty)."""
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    size = -(-full_rows // world)
    start = min(rank * size, full_rows)
    return slice(start, min(start + size, full_rows))


def zero3_chunk(p: Tensor) -> tuple[int, int]:
    """(start, stop): the elements of the row-major flattened ZeRO-3 parameter p held on this
    rank (stop ≤ start when the rank holds none of it)."""
    chunk = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * chunk
    return start, min(start + chunk, p.ds_numel)


def held_whole(p: Tensor) -> bool:
    """True for a small ZeRO-3 parameter DeepSpeed keeps whole on every rank (``ds_persist``,
    below its persistence threshold) once it has gathered it, at the first forward; before that
    (right after ``zero.Init`` or ``deepspeed.initialize``) only its chunk exists."""
    return bool(getattr(p, "ds_persist", False)) and p.data.numel() == p.ds_numel


def local_values(p: Tensor) -> Tensor:
    """The values of parameter p stored on this rank (its ZeRO-3 partition, its FSDP2 shard, or
    the whole tensor), without communication."""
    kind = layout_of(p)
    if kind == "zero3":
        return p.ds_tensor
    if kind == "fsdp2":
        return p.to_local()
    return p


def full_tensor(p: Tensor) -> Tensor:
    """The whole tensor of a parameter (FSDP2 DTensor → ``full_tensor()``; others as they are).
    Collective for DTensors; ZeRO-3 parameters need :func:`gathered` around it."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _z3_master(p: Tensor) -> Tensor | None:
    """The optimizer's fp32 partition of a trainable ZeRO-3 parameter (None: no engine owns it)."""
    if not (p.requires_grad and hasattr(p, "_z3_optimizer")):
        return None
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p)


@torch.no_grad()
def assign(p: Tensor, value: Tensor) -> None:
    """Write the full ``value`` (same on every rank) into parameter p, whatever its layout.

    Only this rank's part is written; no communication. ZeRO-3: the ``ds_tensor`` chunk (and the
    optimizer's fp32 master of it, if an engine owns one); FSDP2: the local shard; ZeRO-1/2: the
    module tensor and the fp32 fragment of the optimizer; otherwise ``p.copy_``.
    """
    kind = layout_of(p)
    if kind == "zero3":
        start, _ = zero3_chunk(p)
        part = value.reshape(-1).to(p.ds_tensor.dtype)[start: start + p.ds_tensor.ds_numel]
        p.ds_tensor.data.view(-1)[: part.numel()].copy_(part)
        if held_whole(p):  # small parameters stay whole on every rank
            p.data.copy_(value.reshape(p.shape).to(p.dtype))
        master = _z3_master(p)
        if master is not None:
            master.view(-1)[: part.numel()].copy_(part)
        return
    if kind == "fsdp2":
        local = p.to_local()
        dim = p.placements[0].dim
        sl = dtensor_rows(value.shape[dim], p)
        local.copy_(value.narrow(dim, sl.start, sl.stop - sl.start).to(local.dtype))
        return
    p.data.copy_(value.to(p.dtype))
    hp = getattr(p, "_hp_mapping", None)
    if hp is not None:
        addr = hp.lp_fragment_address
        hp.hp_fragment.data.copy_(value.reshape(-1)[addr.start: addr.start + addr.numel])


@torch.no_grad()
def refresh_master(p: Tensor) -> None:
    """Copy a parameter's module value into the engine's fp32 master of it, after it was written
    outside the optimizer (LOI, re-initialisation): ZeRO-3 ``ds_tensor`` → fp32 partition,
    ZeRO-1/2 ``lp_fragment`` → ``hp_fragment``. A no-op elsewhere."""
    if hasattr(p, "ds_id"):
        master = _z3_master(p)
        if master is None:
            return
        part = p.ds_tensor.data.view(-1)[: master.numel()]
        if held_whole(p):  # kept whole on every rank: the chunk may be stale
            start, _ = zero3_chunk(p)
            whole = p.data.view(-1)[start: start + part.numel()]
            part[: whole.numel()].copy_(whole)
        master.copy_(part.to(master.dtype))
    elif getattr(p, "_hp_mapping", None) is not None:
        p._hp_mapping.update_hp()


@torch.no_grad()
def shift_base(weight: Tensor, b0: Tensor, a0: Tensor) -> None:
    """W ← W − B₀A₀ (fp32) on this rank's part of a frozen base weight only; no m×n collective.

    ZeRO-3: the ``ds_tensor`` chunk covers rows [i0, i1) of the row-major m×n weight (partially at
    both ends); only those rows of B₀A₀ are formed. FSDP2 (``Shard(0)``): the local rows.
    Otherwise the whole weight.
    """
    kind = layout_of(weight)
    if kind == "zero3":
        if held_whole(weight):  # small weights stay whole on every rank
            weight.data.copy_((weight.data.float() - b0.float() @ a0.float()).to(weight.dtype))
        flat = weight.ds_tensor.data.view(-1)
        n = a0.shape[1]
        start, stop = zero3_chunk(weight)
        if stop <= start:
            return
        i0, i1 = start // n, -(-stop // n)
        delta = (b0[i0:i1].float() @ a0.float()).reshape(-1)[start - i0 * n: stop - i0 * n]
        part = flat[: stop - start]
        part.copy_((part.float() - delta.to(part.device)).to(part.dtype))
        return
    if kind == "fsdp2":
        if tuple(p.dim for p in weight.placements if hasattr(p, "dim")) != (0,):
            raise ValueError(f"shift_base expects a Shard(0) base weight, but got "
                             f"{weight.placements}")
        local = weight.to_local()
        sl = dtensor_rows(b0.shape[0], weight)
        delta = b0[sl].float() @ a0.float()
        local.copy_((local.float() - delta.to(local.device)).to(local.dtype))
        return
    weight.copy_((weight.float() - (b0.float() @ a0.float()).to(weight.device)).to(weight.dtype))


@contextlib.contextmanager
def gathered(params: list[Tensor], modify: bool = False):
    """Make full parameters visible inside the block under ZeRO-3 (a no-op elsewhere).

    With ``modify=True`` the values written inside the block are re-partitioned on exit (rank 0's
    values win) and copied into the engine's fp32 master partitions, if any. FSDP2 parameters stay
    sharded: write them with :func:`assign` (which handles DTensors).
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    else:
        yield
    if modify:  # an engine's fp32 master copies (ZeRO-1/2/3) must see the new values too
        for p in params:
            refresh_master(p)
