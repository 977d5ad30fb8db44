"""DeepSpeed ZeRO layouts: an adapter's factors as flat row-major fragments of fp32 partitions.

A DeepSpeed client optimizer never sees matrices. This rank holds the elements
``[start, start + numel)`` of each row-major flattened factor (possibly none):

- ZeRO-1/2 (``p._hp_mapping``): one flat fp32 partition per param group, cut anywhere;
  ``lp_fragment_address`` locates the slice, ``hp_fragment`` is the fp32 master view and the
  averaged gradient is the same slice of the partition's ``.grad`` (set by DeepSpeed for the
  duration of ``step``).
- ZeRO-3 (``p.ds_id``): contiguous chunks of ``ceil(numel / world)`` elements per rank (the last
  padded); master and gradient are slices of the sub-group's flat fp32 partition and its ``.grad``.

Every rank's (start, numel) of every adapter's lora_A and lora_B is all-gathered once, at the
first step (``setup_comm``). From that table
:class:`~riemann_zero.sharding.exchange.FragmentExchange` turns this rank's fragments into the row
blocks the step works on, and back, with ONE all-to-all each way per adapter and step
(``all_to_all.exchange`` / ``exchange_back``):

- **m side** (lora_B, m × 2r): the fragment is a row block whose first and last rows may be
  partial. The rank holding a row's first element owns the row; a leading partial row travels to
  its owner (values and gradients) and its new values come back. Grams over m are all-reduced
  (``reduce_m``).
- **n side** (lora_A, 2r × n): a flat cut of lora_A is a block of *columns* of Aᵀ, useless for
  Grams over n, so it is transposed: rank j receives columns [c_j, c_{j+1}) of lora_A, i.e. a row
  block of Aᵀ = [V | K] of about n/world rows (none when n < world), with its K block's gradient
  (the V block's gradient is used by no algorithm and is zero). Grams over n are all-reduced over
  the same group (``reduce_n``), as under FSDP2.

Per rank and adapter, the exchange moves its own lora_A fragment with the fragment's K-block
gradients and fewer than 2·2r boundary numbers out, its Aᵀ block (≈ 2r·n/world) and its last
row's foreign part back: it falls with the world. Nothing m × n, nor a whole factor, is sent.
"""

from __future__ import annotations

import abc
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from riemann_zero.sharding.comm import CountingAllGather, CountingAllReduce, CountingAllToAll
from riemann_zero.sharding.exchange import FragmentExchange
from riemann_zero.sharding.params import AdapterLike, zero3_chunk

__all__ = ["ZeroFlatShards", "Zero3Shards", "Fragment"]


@dataclass
class Fragment:
    """Elements [start, start + numel) of a row-major flattened parameter held on this rank."""

    start: int
    numel: int
    value: Tensor | None  # 1-D fp32 master view (writable), None if numel == 0
    flat: Tensor | None  # the flat fp32 partition ``value`` lives in (its .grad is the gradient)
    offset: int  # position of ``value`` inside ``flat``

    def grad(self) -> Tensor:
        """The averaged fp32 gradient of the fragment (zeros if the engine holds none)."""
        g = None if self.flat is None else self.flat.grad
        if g is None or self.numel == 0:
            return torch.zeros(self.numel, dtype=torch.float32,
                               device=None if self.value is None else self.value.device)
        return g.narrow(0, self.offset, self.numel)


class _FlatShards(abc.ABC):
    """Shared logic of the ZeRO layouts; subclasses only locate fragments (``_fragment``)."""

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
        mine = torch.tensor([[f.start, f.numel] for ad in adapters
                             for f in (self._fragment(ad.lora_A), self._fragment(ad.lora_B))],
                            dtype=torch.int64, device=self.device)
        table = CountingAllGather(self.setup_comm, "all_gather.setup", group)(mine).cpu()
        self._exchange = {
            ad.name: FragmentExchange(ad.r, ad.m, ad.n, table[:, 2 * i], table[:, 2 * i + 1],
                                      self.rank, self.device)
            for i, ad in enumerate(adapters)}

    @abc.abstractmethod
    def _fragment(self, p: Tensor) -> Fragment:
        """This rank's slice of parameter ``p`` in the engine's flat partition."""

    def fragments(self, ad: AdapterLike) -> tuple[tuple[int, int], tuple[int, int]]:
        """This rank's ((start, numel) of lora_A, (start, numel) of lora_B): what
        :func:`~riemann_zero.sharding.accounting.step_bytes` needs under ZeRO-1/2."""
        fa, fb = self._fragment(ad.lora_A), self._fragment(ad.lora_B)
        return (fa.start, fa.numel), (fb.start, fb.numel)

    def _pieces(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(values, gradient) of this rank's fragment of p (empty tensors if it holds none)."""
        f = self._fragment(p)
        if f.numel == 0:
            empty = torch.zeros(0, device=self.device)
            return empty, empty
        return f.value, f.grad()

    def read(self, ad: AdapterLike, state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._exchange[ad.name].read(*self._pieces(ad.lora_A), *self._pieces(ad.lora_B),
                                            self._there)

    @torch.no_grad()
    def write(self, ad: AdapterLike, state: dict, b: Tensor, at: Tensor) -> None:
        new_a, new_b = self._exchange[ad.name].write(b, at, self._back)
        for f, new in ((self._fragment(ad.lora_A), new_a), (self._fragment(ad.lora_B), new_b)):
            if f.numel:
                f.value.copy_(new)


class ZeroFlatShards(_FlatShards):
    """ZeRO-1/2: fragments from ``p._hp_mapping`` (None: this rank holds nothing of p)."""

    def __init__(self, adapters: list[AdapterLike], group: dict | None) -> None:
        if group is None or len(group["params"]) != 1:
            raise ValueError("ZeRO-1/2: expected the manifold param group to hold one flat fp32 "
                             "partition at step time; pass this optimizer to deepspeed.initialize "
                             "unchanged (one group of adapters, one AdamW group)")
        self.flat = group["params"][0]
        self.device = self.flat.device
        pg = next((getattr(p, "_dp_group", None) for ad in adapters for p in (ad.lora_B, ad.lora_A)
                   if getattr(p, "_dp_group", None) is not None), None)
        super().__init__(adapters, pg)

    def _fragment(self, p: Tensor) -> Fragment:
        hp = p._hp_mapping
        if hp is None:
            return Fragment(0, 0, None, None, 0)
        value = hp.hp_fragment
        if value.untyped_storage().data_ptr() != self.flat.untyped_storage().data_ptr():
            raise ValueError("ZeRO-1/2: an adapter parameter is mapped into another param group "
                             "than the manifold group; keep adapters in the optimizer's group 0")
        return Fragment(hp.lp_fragment_address.start, hp.lp_fragment_address.numel, value,
                        self.flat, hp.hp_fragment_address.start)


class Zero3Shards(_FlatShards):
    """ZeRO-3: fragment = this rank's ``ds_tensor`` chunk; fp32 master and gradient from the
    optimizer's flat sub-group partition (all adapters must live in one sub-group)."""

    def __init__(self, adapters: list[AdapterLike]) -> None:
        opt = adapters[0].lora_B._z3_optimizer
        self.opt = opt
        self.device = opt.fp32_partitioned_groups_flat[0].device
        sub = {opt.grad_position[opt.get_param_id(p)][0]
               for ad in adapters for p in (ad.lora_A, ad.lora_B)}
        if len(sub) != 1:
            total = sum(ad.lora_A.ds_numel + ad.lora_B.ds_numel for ad in adapters)
            raise ValueError(
                f"ZeRO-3 split the adapters over {len(sub)} optimizer sub-groups, but one manifold "
                f"step must see them all at once. Fix: set zero_optimization.sub_group_size >= "
                f"{total} (the adapters' total size)")
        super().__init__(adapters, adapters[0].lora_B.ds_process_group)

    def _fragment(self, p: Tensor) -> Fragment:
        gid, offset, _ = self.opt.grad_position[self.opt.get_param_id(p)]
        start, stop = zero3_chunk(p)
        numel = max(0, stop - start)
        flat = self.opt.fp32_partitioned_groups_flat[gid]
        if numel == 0:
            return Fragment(start, 0, None, flat, offset)
        return Fragment(start, numel, flat.narrow(0, offset, numel), flat, offset)
