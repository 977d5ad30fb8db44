"""DeepSpeed ZeRO layouts: an adapter's factors as flat row-major pieces of fp32 partitions.

A DeepSpeed client optimizer never sees matrices. This rank holds one piece of each row-major
flattened factor, the elements ``[start, start + numel)`` (possibly none), as its layout
(:data:`~riemann_zero.sharding.layouts.ZERO12`, :data:`~riemann_zero.sharding.layouts.ZERO3`)
finds it:

- ZeRO-1/2 (``p._hp_mapping``): one flat fp32 partition per param group, cut anywhere;
  ``lp_fragment_address`` locates the slice, ``hp_fragment`` is the fp32 master view and the
  averaged gradient is the same slice of the partition's ``.grad`` (set by DeepSpeed for the
  duration of ``step``).
- ZeRO-3 (``p.ds_id``): contiguous chunks of ``ceil(numel / world)`` elements per rank (the last
  padded); master and gradient are slices of the sub-group's flat fp32 partition and its ``.grad``.

Every rank's (start, numel) of every adapter's lora_A and lora_B is all-gathered once, at the
first step (``setup_comm``). From that table
:class:`~riemann_zero.sharding.exchange.PieceExchange` turns this rank's pieces into the row
blocks the step works on, and back, with ONE all-to-all each way per adapter and step
(``all_to_all.exchange`` / ``exchange_back``):

- **m side** (lora_B, m × 2r): the piece is a row block whose first and last rows may be
  partial. The rank holding a row's first element owns the row; a leading partial row travels to
  its owner (values and gradients) and its new values come back. Grams over m are all-reduced
  (``reduce_m``).
- **n side** (lora_A, 2r × n): a flat cut of lora_A is a block of *columns* of Aᵀ, useless for
  Grams over n, so it is transposed: rank j receives columns [c_j, c_{j+1}) of lora_A, i.e. a row
  block of Aᵀ = [V | K] of about n/world rows (none when n < world), with its K block's gradient
  (the V block's gradient is used by no algorithm and is zero). Grams over n are all-reduced over
  the same group (``reduce_n``), as under FSDP2.

Per rank and adapter, the exchange moves its own lora_A piece with the piece's K-block
gradients and fewer than 2·2r boundary numbers out, its Aᵀ block (≈ 2r·n/world) and its last
row's foreign part back: it falls with the world. Nothing m × n, nor a whole factor, is sent.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

from riemann_zero.sharding.comm import CountingAllGather, CountingAllReduce, CountingAllToAll
from riemann_zero.sharding.exchange import PieceExchange
from riemann_zero.sharding.layouts import ZERO3, ZERO12, Layout, Piece, Span
from riemann_zero.sharding.params import AdapterLike

__all__ = ["ZeroFlatShards", "Zero3Shards"]


class _FlatShards:
    """Shared logic of the ZeRO layouts; subclasses only say which layout and which flat
    partition (``layout``, ``flat``) and check that the engine kept the adapters together."""

    layout: Layout
    flat: Tensor | None = None  # ZeRO-1/2: the manifold group's flat fp32 partition

    def __init__(self, adapters: list[AdapterLike], group) -> None:
        self.comm: Counter[str] = Counter()
        self.setup_comm: Counter[str] = Counter()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.reduce_m = CountingAllReduce(self.comm, "all_reduce.gram_m", group)
        self.reduce_n = CountingAllReduce(self.comm, "all_reduce.gram_n", group)
        self._there = CountingAllToAll(self.comm, "all_to_all.exchange", group)
        self._back = CountingAllToAll(self.comm, "all_to_all.exchange_back", group)
        # Every rank's (start, numel) of lora_A and lora_B per adapter: one small collective, once.
        mine = torch.tensor([span for ad in adapters for span in self.pieces(ad)],
                            dtype=torch.int64, device=self.device)
        table = CountingAllGather(self.setup_comm, "all_gather.setup", group)(mine).cpu()
        self._exchange = {
            ad.name: PieceExchange(ad.r, ad.m, ad.n, table[:, 2 * i], table[:, 2 * i + 1],
                                   self.rank, self.device)
            for i, ad in enumerate(adapters)}

    def _piece(self, p: Tensor) -> Piece:
        return self.layout.piece(p, self.flat)

    def pieces(self, ad: AdapterLike) -> tuple[Span, Span]:
        """This rank's ((start, numel) of lora_A, (start, numel) of lora_B): what
        :func:`~riemann_zero.sharding.accounting.step_bytes` needs under ZeRO-1/2."""
        pa, pb = self._piece(ad.lora_A), self._piece(ad.lora_B)
        return (pa.start, pa.numel), (pb.start, pb.numel)

    def _values_and_grad(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(values, averaged fp32 gradient) of this rank's piece of p (empty tensors if it holds
        none; zeros if the engine holds no gradient)."""
        piece = self._piece(p)
        if piece.numel == 0:
            empty = torch.zeros(0, device=self.device)
            return empty, empty
        if piece.grad is None:
            return piece.value, torch.zeros(piece.numel, dtype=torch.float32,
                                            device=piece.value.device)
        return piece.value, piece.grad

    def read(self, ad: AdapterLike, state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._exchange[ad.name].read(*self._values_and_grad(ad.lora_A),
                                            *self._values_and_grad(ad.lora_B), self._there)

    @torch.no_grad()
    def write(self, ad: AdapterLike, state: dict, b: Tensor, at: Tensor) -> None:
        new_a, new_b = self._exchange[ad.name].write(b, at, self._back)
        for piece, new in ((self._piece(ad.lora_A), new_a), (self._piece(ad.lora_B), new_b)):
            if piece.numel:
                piece.value.copy_(new)


class ZeroFlatShards(_FlatShards):
    """ZeRO-1/2: pieces from ``p._hp_mapping`` (None: this rank holds nothing of p)."""

    layout = ZERO12

    def __init__(self, adapters: list[AdapterLike], group: dict | None) -> None:
        if group is None or len(group["params"]) != 1:
            raise ValueError("ZeRO-1/2: expected the manifold param group to hold one flat fp32 "
                             "partition at step time; pass this optimizer to deepspeed.initialize "
                             "unchanged (one group of adapters, one AdamW group)")
        self.flat = group["params"][0]
        self.device = self.flat.device
        pg = next((g for ad in adapters for p in (ad.lora_B, ad.lora_A)
                   if (g := ZERO12.group(p)) is not None), None)
        super().__init__(adapters, pg)

    @classmethod
    def build(cls, adapters: list[AdapterLike], param_groups: list[dict]) -> ZeroFlatShards:
        """From the optimizer's param groups at the first step (the manifold group's partition)."""
        return cls(adapters, next((g for g in param_groups if g.get("kind") == "manifold"), None))


class Zero3Shards(_FlatShards):
    """ZeRO-3: piece = this rank's ``ds_tensor`` chunk; fp32 master and gradient from the
    optimizer's flat sub-group partition (all adapters must live in one sub-group)."""

    layout = ZERO3

    def __init__(self, adapters: list[AdapterLike]) -> None:
        opt = adapters[0].lora_B._z3_optimizer
        self.device = opt.fp32_partitioned_groups_flat[0].device
        sub = {opt.grad_position[opt.get_param_id(p)][0]
               for ad in adapters for p in (ad.lora_A, ad.lora_B)}
        if len(sub) != 1:
            total = sum(ad.lora_A.ds_numel + ad.lora_B.ds_numel for ad in adapters)
            raise ValueError(
                f"ZeRO-3 split the adapters over {len(sub)} optimizer sub-groups, but one manifold "
                f"step must see them all at once. Fix: set zero_optimization.sub_group_size >= "
                f"{total} (the adapters' total size)")
        super().__init__(adapters, ZERO3.group(adapters[0].lora_B))

    @classmethod
    def build(cls, adapters: list[AdapterLike], param_groups: list[dict]) -> Zero3Shards:
        return cls(adapters)
