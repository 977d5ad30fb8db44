"""Whole-tensor optimizers under an engine: which contiguous piece of a parameter lives here.

Tensorion needs each tensor whole on one rank (its owner) for one step, then hands every other
rank back its own elements. Under every layout of :mod:`riemann_zero.sharding.params` this rank
holds one contiguous range ``[start, start + numel)`` of the parameter's row-major flattening:

- ``"local"`` (no engine, DDP, ZeRO-0): all of it (``whole``: every rank holds the same values);
- ``"fsdp2"``: the local rows of a ``Shard(0)`` DTensor (torch.chunk pieces, possibly empty);
- ``"zero12"``: the fragment ``p._hp_mapping`` of the flat fp32 partition (cut anywhere);
- ``"zero3"``: the ``ds_tensor`` chunk, whose fp32 master and gradient are slices of the
  optimizer's flat sub-group partition.

:class:`Piece` gives the fp32 master values (writable) and gradient of those elements; the owner
collects a whole tensor with one ``reduce`` of a zero-padded buffer and sends the result back with
one ``broadcast`` (:class:`~riemann_zero.sharding.comm.CountingReduce`,
:class:`~riemann_zero.sharding.comm.CountingBroadcast`). Nothing here knows what a tensor means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from riemann_zero.sharding.params import dtensor_rows, layout_of, zero3_chunk

__all__ = ["Piece", "stored_shape", "piece_of", "process_group", "zero3_partition",
           "world_and_rank", "global_rank"]


@dataclass
class Piece:
    """Elements [start, start + numel) of a parameter's row-major flattening held on this rank."""

    start: int
    numel: int
    value: Tensor | None  # 1-D writable view of the master values (None when numel == 0)
    grad: Tensor | None  # 1-D gradient of those elements (None: no gradient reached them)
    whole: bool  # every rank holds the whole tensor with the same values (no engine, DDP)


def stored_shape(p: Tensor) -> tuple[int, ...]:
    """The full shape of parameter p, whatever its layout (ZeRO-3 keeps it in ``ds_shape``)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def process_group(p: Tensor):
    """The data-parallel process group the engine shards p over (None: the default group)."""
    kind = layout_of(p)
    if kind == "zero3":
        return p.ds_process_group
    if kind == "zero12":
        return getattr(p, "_dp_group", None)
    if kind == "fsdp2":
        return p.device_mesh.get_group()
    return None


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def piece_of(p: Tensor, flat: Tensor | None = None) -> Piece:
    """This rank's piece of parameter p.

    Args:
        p: the model parameter (as the engine laid it out).
        flat: under ZeRO, the flat fp32 partition the optimizer is stepping now (its ``.grad`` is
            the averaged gradient); ignored elsewhere.
    """
    kind = layout_of(p)
    numel = math.prod(stored_shape(p))
    if kind == "local":
        grad = None if p.grad is None else _flat(p.grad)
        return Piece(0, numel, p.data.view(-1), grad, whole=True)
    if kind == "fsdp2":
        from torch.distributed.tensor import Shard

        if tuple(p.placements) != (Shard(0),):
            raise ValueError(f"FSDP2 placement {tuple(p.placements)} of a {tuple(p.shape)} "
                             f"parameter: whole-tensor optimizers need Shard(0) (FSDP2's default)")
        rows = dtensor_rows(p.shape[0], p)
        inner = numel // p.shape[0] if p.shape[0] else 0
        local = p.to_local()
        grad = None if p.grad is None else _flat(p.grad.to_local())
        return Piece(rows.start * inner, (rows.stop - rows.start) * inner, local.view(-1), grad,
                     whole=False)
    if kind == "zero12":
        hp = p._hp_mapping
        if hp is None:
            return Piece(0, 0, None, None, whole=False)
        value = hp.hp_fragment
        if flat is None or value.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            raise ValueError("ZeRO-1/2: a parameter is mapped into another param group than the "
                             "one being stepped; keep each param group as the optimizer built it")
        n = hp.lp_fragment_address.numel
        grad = None if flat.grad is None else flat.grad.narrow(0, hp.hp_fragment_address.start, n)
        return Piece(hp.lp_fragment_address.start, n, value.view(-1), grad, whole=False)
    # zero3
    opt = p._z3_optimizer
    gid, offset, _ = opt.grad_position[opt.get_param_id(p)]
    part = opt.fp32_partitioned_groups_flat[gid]
    start, stop = zero3_chunk(p)
    n = max(0, stop - start)
    if n == 0:
        return Piece(start, 0, None, None, whole=False)
    grad = None if part.grad is None else part.grad.narrow(0, offset, n)
    return Piece(start, n, part.narrow(0, offset, n), grad, whole=False)


def zero3_partition(p: Tensor) -> Tensor:
    """The flat fp32 sub-group partition that holds ZeRO-3 parameter p's master."""
    opt = p._z3_optimizer
    return opt.fp32_partitioned_groups_flat[opt.grad_position[opt.get_param_id(p)][0]]


def world_and_rank(group) -> tuple[int, int]:
    """(world size, rank) in ``group``; (1, 0) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (collectives take global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)

