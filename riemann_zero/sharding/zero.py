"""DeepSpeed ZeRO layouts: an adapter's factors as flat row-major fragments of fp32 partitions.

A DeepSpeed client optimizer never sees matrices. This rank holds the elements
``[start, start + numel)`` of each row-major flattened factor (possibly none):

- ZeRO-1/2 (``p._hp_mapping``): one flat fp32 partition per param group, cut anywhere;
  ``lp_fragment_address`` locates the slice, ``hp_fragment`` is the fp32 master view and the
  averaged gradient is the same slice of the partition's ``.grad`` (set by DeepSpeed for the
  duration of ``step``).
- ZeRO-3 (``p.ds_id``): contiguous chunks of ``ceil(numel / world)`` elements per rank (the last
  padded); master and gradient are slices of the sub-group's flat fp32 partition and its ``.grad``.

**m side** (lora_B, m × 2r): the fragment is a row block whose first and last rows may be partial.
The rank holding a row's first element owns the whole row: one all-reduce of a zero-padded
``world × (1 + 4r)`` buffer (row id, values, gradients of each rank's leading partial row) completes
the owners' rows; after the step one ``world × 2r`` all-reduce returns the new values of partial
rows to the ranks holding them. Skipped for adapters whose fragments all start on row boundaries
(checked once). Grams over m are all-reduced (``reduce_m``).

**n side** (lora_A, 2r × n): a flat cut of lora_A is a block of *columns* of Aᵀ, useless for Grams
over n, so Aᵀ is gathered by one zero-padded all-reduce of its values (2r × n) and of the gradient
of the K block (r × n; the V block's gradient is used by no algorithm and is returned as zeros).
Every rank then holds all n rows (``reduce_n`` is None), computes the same n-side update and
writes back its own fragment. Nothing m × n is ever formed or sent.
"""

from __future__ import annotations

import abc
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from riemann_zero.sharding.comm import CountingAllReduce, gather_lora_a
from riemann_zero.sharding.params import AdapterLike, zero3_chunk

__all__ = ["ZeroFlatShards", "Zero3Shards", "Fragment", "owned_rows"]


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


def owned_rows(start: int, numel: int, cols: int) -> tuple[int, int, int]:
    """(first, end, head): rows [first, end) start inside the fragment and are owned here; the
    leading ``head`` elements belong to row first − 1, owned by an earlier rank."""
    if numel == 0:
        return 0, 0, 0
    first = -(-start // cols)
    end = -(-(start + numel) // cols)
    head = min(first * cols - start, numel)
    return first, max(first, end), head


class _FlatShards(abc.ABC):
    """Shared logic of the ZeRO layouts; subclasses only locate fragments (``_fragment``)."""

    reduce_n = None

    def __init__(self, adapters: list[AdapterLike], group) -> None:
        self.comm: Counter[str] = Counter()
        self.setup_comm: Counter[str] = Counter()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.reduce_m = CountingAllReduce(self.comm, "all_reduce.gram_m", group)
        self._gather = CountingAllReduce(self.comm, "all_reduce.gather_n", group)
        self._rows_in = CountingAllReduce(self.comm, "all_reduce.boundary_rows", group)
        self._rows_out = CountingAllReduce(self.comm, "all_reduce.boundary_rows_back", group)
        self._partial: dict[str, bool] = {}
        self._slots: dict[str, list[int]] = {}
        # Which adapters have a partial row anywhere: one small collective, once.
        heads = torch.tensor([float(owned_rows(f.start, f.numel, 2 * ad.r)[2] > 0)
                              for ad in adapters for f in [self._fragment(ad.lora_B)]],
                             device=self.device)
        CountingAllReduce(self.setup_comm, "all_reduce.setup", group)(heads)
        self._partial = {ad.name: bool(h > 0) for ad, h in zip(adapters, heads.tolist())}

    @abc.abstractmethod
    def _fragment(self, p: Tensor) -> Fragment:
        """This rank's slice of parameter ``p`` in the engine's flat partition."""

    # ------------------------------------------------------------------------------ read
    def read(self, ad: AdapterLike, state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, gb = self._read_rows(ad)
        at, gat = self._gather_n(ad)
        return b, gb, at, gat

    def _read_rows(self, ad: AdapterLike) -> tuple[Tensor, Tensor]:
        c = 2 * ad.r
        f = self._fragment(ad.lora_B)
        first, end, head = owned_rows(f.start, f.numel, c)
        rows = end - first
        b = torch.zeros(rows * c, dtype=torch.float32, device=self.device)
        gb = torch.zeros(rows * c, dtype=torch.float32, device=self.device)
        own = min(rows * c, f.numel - head)
        if own > 0:
            b[:own] = f.value[head: head + own]
            gb[:own] = f.grad()[head: head + own]
        if self._partial[ad.name]:
            buf = torch.zeros(self.world, 1 + 2 * c, device=self.device)
            if head > 0:
                col = f.start % c
                buf[self.rank, 0] = f.start // c + 1
                buf[self.rank, 1 + col: 1 + col + head] = f.value[:head]
                buf[self.rank, 1 + c + col: 1 + c + col + head] = f.grad()[:head]
            buf = self._rows_in(buf)
            slots = []
            if rows > 0 and own < rows * c:  # my last row continues on later ranks
                slots = torch.nonzero(buf[:, 0] == end).flatten().tolist()
                tail = buf[slots].sum(0)
                b[-c:] += tail[1: 1 + c]
                gb[-c:] += tail[1 + c:]
            self._slots[ad.name] = slots
        return b.view(rows, c), gb.view(rows, c)

    def _gather_n(self, ad: AdapterLike) -> tuple[Tensor, Tensor]:
        f = self._fragment(ad.lora_A)
        return gather_lora_a(ad.r, ad.n, f.start, f.value, f.grad() if f.numel else None,
                             self._gather, dtype=torch.float32, device=self.device)

    # ----------------------------------------------------------------------------- write
    @torch.no_grad()
    def write(self, ad: AdapterLike, state: dict, b: Tensor, at: Tensor) -> None:
        c = 2 * ad.r
        f = self._fragment(ad.lora_B)
        first, end, head = owned_rows(f.start, f.numel, c)
        rows = end - first
        own = min(rows * c, f.numel - head)
        if own > 0:
            f.value[head: head + own] = b.reshape(-1)[:own].to(f.value.dtype)
        if self._partial[ad.name]:
            buf = torch.zeros(self.world, c, device=self.device)
            for j in self._slots.get(ad.name, []):
                buf[j] = b[-1]
            buf = self._rows_out(buf)
            if head > 0:
                col = f.start % c
                f.value[:head] = buf[self.rank, col: col + head].to(f.value.dtype)
        fa = self._fragment(ad.lora_A)
        if fa.numel > 0:
            flat = at.mT.reshape(-1)
            fa.value.copy_(flat[fa.start: fa.start + fa.numel].to(fa.value.dtype))


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
