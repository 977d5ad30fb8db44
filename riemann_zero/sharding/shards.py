"""Where each adapter's rows live on this rank, and which collective sums the small Grams.

The manifold optimizers see an adapter only through a *shards* object:

- ``read(ad, state)`` → (B, gB, Aᵀ, gAᵀ): this rank's rows of lora_B = [Z | U] (m_loc × 2r) and of
  lora_Aᵀ = [V | K] (n_loc × 2r) as fp32/fp64 master values, with their gradients (zeros if none);
- ``write(ad, state, B, Aᵀ)``: store new rows (and refresh low-precision model copies);
- ``reduce_m`` / ``reduce_n``: sum a small tensor over the ranks holding m-side / n-side rows
  (``None`` = this rank holds all rows: :class:`LocalShards`). Under every engine both are set
  and sum over the same ranks, so one reduction of stacked m- and n-side blocks serves both;
- ``comm``: bytes handed to each collective since the last ``comm.clear()``, keyed
  ``"<collective>.<purpose>"`` (payload size: what one rank passes to the call; for an
  all-to-all, its send buffer).

One shards class per layout (:mod:`riemann_zero.sharding.layouts`; :func:`resolve_shards` picks
the class whose ``layout`` the adapters' parameters have at the first step, once an engine has
laid them out):

- no engine / DDP / ZeRO-0 fp32: :class:`LocalShards`, every reduction the identity;
- FSDP2 (DTensor parameters): :class:`FsdpShards`, lora_B rows and lora_Aᵀ rows (lora_A on
  ``Shard(1)``) are this rank's local tensors, Grams all-reduced; lora_A on ``Shard(0)`` (rows
  of lora_A, where the world does not divide n) is transposed into row blocks of Aᵀ by the
  exchange of :mod:`riemann_zero.sharding.exchange`;
- DeepSpeed ZeRO-1/2 (``_hp_mapping``) and ZeRO-3 (``ds_id``): flat pieces, turned into row
  blocks of B and Aᵀ by the same exchange, see :mod:`riemann_zero.sharding.zero`.

Adapters are seen only through :class:`~riemann_zero.sharding.params.AdapterLike` (name, r, m,
n, lora_A, lora_B): this layer knows no PEFT.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

from riemann_zero.sharding.comm import CountingAllReduce, CountingAllToAll
from riemann_zero.sharding.exchange import PieceExchange, chunk
from riemann_zero.sharding.layouts import FSDP2, LOCAL, Layout, layout_of
from riemann_zero.sharding.params import AdapterLike
from riemann_zero.sharding.zero import Zero3Shards, ZeroFlatShards

__all__ = ["LocalShards", "FsdpShards", "SHARDS", "resolve_shards"]

_MASTER_DTYPES = (torch.float32, torch.float64)


def _master(p: Tensor, state: dict, key: str, transpose: bool) -> Tensor:
    """p itself (transposed view) if fp32/fp64, else an fp32 master copy kept in ``state``."""
    if p.dtype in _MASTER_DTYPES:
        return p.mT if transpose else p
    if key not in state:
        value = p.detach().float()
        state[key] = (value.mT if transpose else value).contiguous()
    return state[key]


def _grad(g: Tensor | None, like: Tensor, transpose: bool) -> Tensor:
    if g is None:  # no gradient reached this adapter: a zero gradient, not a skipped step
        return torch.zeros_like(like)
    g = g.mT if transpose else g
    return g.to(like.dtype)


def _write(p: Tensor, state: dict, key: str, value: Tensor, transpose: bool) -> None:
    if key in state:
        state[key].copy_(value)
    p.copy_(value.mT if transpose else value)


class LocalShards:
    """All rows on this process; low-precision (bf16/fp16) parameters get fp32 master copies."""

    layout = LOCAL
    reduce_m = None
    reduce_n = None

    def __init__(self) -> None:
        self.comm: Counter[str] = Counter()

    @classmethod
    def build(cls, adapters: list[AdapterLike], param_groups: list[dict]) -> LocalShards:
        return cls()

    def read(self, ad: AdapterLike, state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b = _master(ad.lora_B, state, "master_B", transpose=False)
        at = _master(ad.lora_A, state, "master_At", transpose=True)
        return b, _grad(ad.lora_B.grad, b, False), at, _grad(ad.lora_A.grad, at, True)

    def write(self, ad: AdapterLike, state: dict, b: Tensor, at: Tensor) -> None:
        _write(ad.lora_B, state, "master_B", b, transpose=False)
        _write(ad.lora_A, state, "master_At", at, transpose=True)


class FsdpShards:
    """FSDP2: lora_B (m×2r) on ``Shard(0)``, so each rank's local tensor is a row block of B.

    lora_A (2r×n) on ``Shard(1)`` (what ``riemann_zero.fsdp_placement`` asks for when the world size
    divides n) makes the local tensor a row block of Aᵀ: every Gram is then one all-reduce over the
    mesh. With FSDP2's default ``Shard(0)`` (split along 2r: whole rows of lora_A, i.e. columns of
    Aᵀ), the same transposing exchange as under ZeRO gives each rank a row block of Aᵀ (one
    all-to-all each way per adapter and step; :mod:`riemann_zero.sharding.exchange`), and the
    Grams are all-reduced as with ``Shard(1)``.
    """

    layout = FSDP2

    def __init__(self, adapters: list[AdapterLike]) -> None:
        from torch.distributed.tensor import Shard

        self.comm: Counter[str] = Counter()
        self._exchange: dict[str, PieceExchange] = {}
        self.group = FSDP2.group(adapters[0].lora_B)
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        for ad in adapters:
            a, b = ad.lora_A, ad.lora_B
            if not (FSDP2.claims(a) and FSDP2.claims(b)):
                raise ValueError(f"{ad.name}: under FSDP2 both lora_A and lora_B must be sharded "
                                 "(apply fully_shard to the module holding the adapter)")
            if tuple(b.placements) != (Shard(0),) or tuple(a.placements) not in ((Shard(0),),
                                                                              (Shard(1),)):
                raise ValueError(
                    f"{ad.name}: FSDP2 placements are lora_B {tuple(b.placements)}, lora_A "
                    f"{tuple(a.placements)}, but the manifold optimizer needs lora_B on Shard(0) "
                    "and lora_A on Shard(1) or Shard(0) (a 1-D mesh). Fix: fully_shard(module, "
                    "shard_placement_fn=riemann_zero.fsdp_placement(model))")
            if tuple(a.placements) == (Shard(0),):
                pieces = torch.tensor([chunk(2 * ad.r * ad.n, self.world, p, unit=ad.n)
                                       for p in range(self.world)])  # torch.chunk of the rows
                self._exchange[ad.name] = PieceExchange(ad.r, ad.m, ad.n, pieces, None,
                                                        self.rank, a.to_local().device)
        self.reduce_m = CountingAllReduce(self.comm, "all_reduce.gram_m", self.group)
        self.reduce_n = CountingAllReduce(self.comm, "all_reduce.gram_n", self.group)
        self._there = CountingAllToAll(self.comm, "all_to_all.exchange", self.group)
        self._back = CountingAllToAll(self.comm, "all_to_all.exchange_back", self.group)

    @classmethod
    def build(cls, adapters: list[AdapterLike], param_groups: list[dict]) -> FsdpShards:
        return cls(adapters)

    def read(self, ad: AdapterLike, state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pb, pa = ad.lora_B, ad.lora_A
        b = _master(pb.to_local(), state, "master_B", transpose=False)
        gb = _grad(None if pb.grad is None else pb.grad.to_local(), b, False)
        ex = self._exchange.get(ad.name)
        if ex is None:  # Shard(1): the local tensor is a row block of Aᵀ already
            at = _master(pa.to_local(), state, "master_At", transpose=True)
            return b, gb, at, _grad(None if pa.grad is None else pa.grad.to_local(), at, True)
        a = _master(pa.to_local(), state, "master_A", transpose=False)  # rows of lora_A
        ga = _grad(None if pa.grad is None else pa.grad.to_local(), a, False)
        _, _, at, gat = ex.read(a.reshape(-1), ga.reshape(-1), None, None, self._there)
        return b, gb, at, gat

    def write(self, ad: AdapterLike, state: dict, b: Tensor, at: Tensor) -> None:
        _write(ad.lora_B.to_local(), state, "master_B", b, transpose=False)
        ex = self._exchange.get(ad.name)
        if ex is None:
            _write(ad.lora_A.to_local(), state, "master_At", at, transpose=True)
        else:
            local = ad.lora_A.to_local()
            new_a, _ = ex.write(None, at, self._back)
            _write(local, state, "master_A", new_a.view(local.shape), transpose=False)


SHARDS = (LocalShards, FsdpShards, ZeroFlatShards, Zero3Shards)  # one per layout


def resolve_shards(adapters: list[AdapterLike], param_groups: list[dict]):
    """The shards object of the adapters' layout, from what the parameters look like at the
    first step."""
    layouts: set[Layout] = {layout_of(p) for ad in adapters for p in (ad.lora_A, ad.lora_B)}
    if len(layouts) > 1:
        raise ValueError(f"adapter parameters are laid out in several ways at once: "
                         f"{sorted(layout.title for layout in layouts)}; wrap the whole model "
                         f"with one engine")
    layout = layouts.pop()
    return next(cls for cls in SHARDS if cls.layout is layout).build(adapters, param_groups)
