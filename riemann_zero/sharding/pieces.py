"""Whole-tensor optimizers under an engine: this rank's piece of a parameter, and who owns it.

Tensorion needs each tensor whole on one rank (its owner) for one step, then hands every other
rank back its own elements. Under every layout (:mod:`riemann_zero.sharding.layouts`) this rank
holds one contiguous range ``[start, start + numel)`` of the parameter's row-major flattening, its
:class:`~riemann_zero.sharding.layouts.Piece`:

- no engine, DDP, ZeRO-0: all of it (``whole``: every rank holds the same values);
- FSDP2: the local rows of a ``Shard(0)`` DTensor (torch.chunk pieces, possibly empty);
- ZeRO-1/2: the piece ``p._hp_mapping`` of the flat fp32 partition (cut anywhere);
- ZeRO-3: the ``ds_tensor`` chunk, whose fp32 master and gradient are slices of the
  optimizer's flat sub-group partition.

The piece gives the fp32 master values (writable) and gradient of those elements; the owner
collects a whole tensor with one ``reduce`` of a zero-padded buffer and sends the result back with
one ``broadcast`` (:class:`~riemann_zero.sharding.comm.CountingReduce`,
:class:`~riemann_zero.sharding.comm.CountingBroadcast`). Nothing here knows what a tensor means.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from riemann_zero.sharding.layouts import Piece, layout_of, stored_shape

__all__ = ["Piece", "stored_shape", "piece_of", "process_group", "world_and_rank",
           "global_rank"]


def process_group(p: Tensor):
    """The data-parallel process group the engine shards p over (None: the default group)."""
    return layout_of(p).group(p)


def piece_of(p: Tensor, flat: Tensor | None = None) -> Piece:
    """This rank's piece of parameter p (see :meth:`~riemann_zero.sharding.layouts.Layout.piece`).

    Args:
        p: the model parameter (as the engine laid it out).
        flat: under ZeRO-1/2, the flat fp32 partition the optimizer is stepping now (its ``.grad``
            is the averaged gradient); ignored elsewhere.
    """
    return layout_of(p).piece(p, flat)


def world_and_rank(group) -> tuple[int, int]:
    """(world size, rank) in ``group``; (1, 0) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (collectives take global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)
