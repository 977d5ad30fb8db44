"""Where each adapter's rows live on this rank, and which collective sums the small Grams.

The manifold optimizers see an adapter only through a *shards* object:

- ``read(ad, state)`` → (B, gB, Aᵀ, gAᵀ): this rank's rows of lora_B = [Z | U] (m_loc × 2r) and of
  lora_Aᵀ = [V | K] (n_loc × 2r) as fp32/fp64 master values, with their gradients (zeros if none);
- ``write(ad, state, B, Aᵀ)``: store new rows (and refresh low-precision model copies);
- ``reduce_m`` / ``reduce_n``: sum a small tensor over the ranks holding m-side / n-side rows
  (``None`` = this rank holds all rows);
- ``comm``: bytes handed to each collective since the last ``comm.clear()``, keyed
  ``"<collective>.<purpose>"`` (payload size: what one rank passes to the call).

Layouts (picked by :func:`resolve_shards` from what the model parameters look like at the first
step, once an engine has laid them out):

- no engine / DDP / ZeRO-0 fp32: :class:`LocalShards`, every reduction the identity;
- FSDP2 (DTensor parameters): :class:`FsdpShards`, lora_B rows and lora_Aᵀ rows (lora_A on
  ``Shard(1)``) are this rank's local tensors, Grams all-reduced;
- DeepSpeed ZeRO-1/2 (``_hp_mapping``) and ZeRO-3 (``ds_id``): flat fragments, see
  :mod:`riemann_zero.zero`.

Also here: the pieces LOI needs under an engine (:func:`sketch_reduce`, :func:`shift_base`,
:func:`assign`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Adapter

__all__ = [
    "LocalShards",
    "FsdpShards",
    "CountingAllReduce",
    "resolve_shards",
    "layout_of",
    "is_dtensor",
    "sketch_reduce",
    "shift_base",
    "assign",
    "fsdp_placement",
    "refresh_master",
]

_MASTER_DTYPES = (torch.float32, torch.float64)


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and their gradients)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


class CountingAllReduce:
    """``t ↦ all_reduce(t)`` over ``group`` (sum), adding the payload bytes to ``comm[key]``."""

    def __init__(self, comm: Counter, key: str, group=None) -> None:
        self.comm, self.key, self.group = comm, key, group

    def __call__(self, t: Tensor) -> Tensor:
        t = t.contiguous()
        self.comm[self.key] += t.numel() * t.element_size()
        dist.all_reduce(t, group=self.group)
        return t


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

    reduce_m = None
    reduce_n = None

    def __init__(self) -> None:
        self.comm: Counter[str] = Counter()

    def read(self, ad: Adapter, state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b = _master(ad.lora_B, state, "master_B", transpose=False)
        at = _master(ad.lora_A, state, "master_At", transpose=True)
        return b, _grad(ad.lora_B.grad, b, False), at, _grad(ad.lora_A.grad, at, True)

    def write(self, ad: Adapter, state: dict, b: Tensor, at: Tensor) -> None:
        _write(ad.lora_B, state, "master_B", b, transpose=False)
        _write(ad.lora_A, state, "master_At", at, transpose=True)


class FsdpShards:
    """FSDP2: lora_B (m×2r) on ``Shard(0)``, so each rank's local tensor is a row block of B.

    lora_A (2r×n) on ``Shard(1)`` (what :func:`fsdp_placement` asks for when world divides n) makes
    the local tensor a row block of Aᵀ: every Gram is then one all-reduce over the mesh. With
    FSDP2's default ``Shard(0)`` (split along 2r), Aᵀ is gathered instead by one zero-padded
    all-reduce of its values and of its K block's gradient, as under ZeRO.

    ``reduce_n`` belongs to the bucket being stepped: :meth:`read` sets it (all adapters of a
    bucket have the same n, hence the same placement).
    """

    def __init__(self, adapters: list[Adapter]) -> None:
        from torch.distributed.tensor import Shard

        self.comm: Counter[str] = Counter()
        self._row_sharded: dict[str, bool] = {}
        for ad in adapters:
            a, b = ad.lora_A, ad.lora_B
            if not (is_dtensor(a) and is_dtensor(b)):
                raise ValueError(f"{ad.name}: under FSDP2 both lora_A and lora_B must be sharded "
                                 "(apply fully_shard to the module holding the adapter)")
            if tuple(b.placements) != (Shard(0),) or tuple(a.placements) not in ((Shard(0),),
                                                                              (Shard(1),)):
                raise ValueError(
                    f"{ad.name}: FSDP2 placements are lora_B {tuple(b.placements)}, lora_A "
                    f"{tuple(a.placements)}, but the manifold optimizer needs lora_B on Shard(0) "
                    "and lora_A on Shard(1) or Shard(0) (a 1-D mesh). Fix: fully_shard(module, "
                    "shard_placement_fn=riemann_zero.distributed.fsdp_placement(model))")
            self._row_sharded[ad.name] = tuple(a.placements) == (Shard(1),)
        self.group = adapters[0].lora_B.device_mesh.get_group()
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.reduce_m = CountingAllReduce(self.comm, "all_reduce.gram_m", self.group)
        self._reduce_n = CountingAllReduce(self.comm, "all_reduce.gram_n", self.group)
        self._gather = CountingAllReduce(self.comm, "all_reduce.gather_n", self.group)
        self.reduce_n = self._reduce_n

    def read(self, ad: Adapter, state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pb, pa = ad.lora_B, ad.lora_A
        b = _master(pb.to_local(), state, "master_B", transpose=False)
        gb = _grad(None if pb.grad is None else pb.grad.to_local(), b, False)
        if self._row_sharded[ad.name]:
            self.reduce_n = self._reduce_n
            at = _master(pa.to_local(), state, "master_At", transpose=True)
            return b, gb, at, _grad(None if pa.grad is None else pa.grad.to_local(), at, True)
        self.reduce_n = None  # Aᵀ gathered: every rank holds all n rows
        a = _master(pa.to_local(), state, "master_A", transpose=False)  # rows [lo, hi) of A
        rows = _local_rows(2 * ad.r, pa)
        r, n = ad.r, ad.n
        buf = torch.zeros(3 * r * n, dtype=a.dtype, device=a.device)
        buf[rows.start * n: rows.stop * n] = a.reshape(-1)
        if pa.grad is not None:  # gradient of the K rows (the last r rows of A) only
            g = pa.grad.to_local().to(a.dtype)
            lo, hi = max(rows.start, r), rows.stop
            if hi > lo:
                buf[2 * r * n + (lo - r) * n: 2 * r * n + (hi - r) * n] = \
                    g[lo - rows.start: hi - rows.start].reshape(-1)
        buf = self._gather(buf)
        full = buf[: 2 * r * n].view(2 * r, n)
        ga = torch.cat([buf.new_zeros(r, n), buf[2 * r * n:].view(r, n)])
        return b, gb, full.mT, ga.mT

    def write(self, ad: Adapter, state: dict, b: Tensor, at: Tensor) -> None:
        _write(ad.lora_B.to_local(), state, "master_B", b, transpose=False)
        if self._row_sharded[ad.name]:
            _write(ad.lora_A.to_local(), state, "master_At", at, transpose=True)
        else:
            rows = _local_rows(2 * ad.r, ad.lora_A)
            _write(ad.lora_A.to_local(), state, "master_A", at.mT[rows], transpose=False)


def fsdp_placement(model: torch.nn.Module) -> Callable[[Tensor], object]:
    """A ``shard_placement_fn`` for ``fully_shard``: lora_A (2r×n) of every manifold adapter on
    ``Shard(1)`` (split along n, so Aᵀ is row-sharded) where the world size divides n, everything
    else FSDP2's default ``Shard(0)``. Build it once from the PEFT model, after
    ``init_process_group`` and before sharding."""
    from torch.distributed.tensor import Shard

    from .layout import find_adapters

    world = dist.get_world_size() if dist.is_initialized() else 1
    # FSDP2 cannot shard dim 1 unevenly: where world ∤ n, keep Shard(0) (Aᵀ is then gathered).
    lora_a = {id(ad.lora_A) for ad in find_adapters(model) if ad.n % world == 0}
    return lambda p: Shard(1) if id(p) in lora_a else None


def layout_of(p: Tensor) -> str:
    """``"zero3"``, ``"zero12"``, ``"fsdp2"`` or ``"local"``: how an engine laid out parameter p."""
    if hasattr(p, "ds_id"):
        return "zero3"
    if hasattr(p, "_hp_mapping"):
        return "zero12"
    if is_dtensor(p):
        return "fsdp2"
    return "local"


def resolve_shards(adapters: list[Adapter], param_groups: list[dict]):
    """Pick the shard layout from what the parameters look like at the first step."""
    kinds = {layout_of(p) for ad in adapters for p in (ad.lora_A, ad.lora_B)}
    if len(kinds) > 1:
        raise ValueError(f"adapter parameters are laid out in several ways at once: "
                         f"{sorted(kinds)}; wrap the whole model with one engine")
    kind = kinds.pop()
    if kind == "local":
        return LocalShards()
    if kind == "fsdp2":
        return FsdpShards(adapters)
    from .zero import Zero3Shards, ZeroFlatShards

    group = next((g for g in param_groups if g.get("kind") == "manifold"), None)
    if kind == "zero3":
        return Zero3Shards(adapters)
    return ZeroFlatShards(adapters, group)


# ------------------------------------------------------------------------------------ LOI
def sketch_reduce(group=None, comm: Counter | None = None) -> Callable[[Tensor], Tensor] | None:
    """The in-place sum of LOI sketches over data-parallel ranks (``None`` without a process group).

    Pass it as ``loi_init(..., reduce=sketch_reduce())``: each rank sketches its own calibration
    batches; the sums are identical on every rank, so every rank derives the same ΔW₀.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None
    return CountingAllReduce(Counter() if comm is None else comm, "all_reduce.loi_sketch", group)


def _local_rows(full_rows: int, p: Tensor) -> slice:
    """Rows of a ``Shard(0)`` DTensor held here (torch.chunk semantics: ceil-sized, tail empty)."""
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    size = -(-full_rows // world)
    start = min(rank * size, full_rows)
    return slice(start, min(start + size, full_rows))


@torch.no_grad()
def assign(p: Tensor, value: Tensor) -> None:
    """Write the full ``value`` (same on every rank) into parameter p, whatever its layout.

    Only this rank's part is written; no communication. ZeRO-3: the ``ds_tensor`` chunk (and the
    optimizer's fp32 master of it, if an engine owns one); FSDP2: the local shard; ZeRO-1/2: the
    module tensor and the fp32 fragment of the optimizer; otherwise ``p.copy_``.
    """
    kind = layout_of(p)
    if kind == "zero3":
        flat = value.reshape(-1).to(p.ds_tensor.dtype)
        chunk = p.ds_tensor.ds_numel
        start = dist.get_rank(group=p.ds_process_group) * chunk
        part = flat[start: start + chunk]
        p.ds_tensor.data.view(-1)[: part.numel()].copy_(part)
        if getattr(p, "ds_persist", False):  # small parameters stay whole on every rank
            p.data.copy_(value.to(p.dtype))
        if p.requires_grad and hasattr(p, "_z3_optimizer"):
            from deepspeed.utils import safe_get_local_fp32_param

            master = safe_get_local_fp32_param(p)
            master.view(-1)[: part.numel()].copy_(part)
        return
    if kind == "fsdp2":
        local = p.to_local()
        dim = p.placements[0].dim
        full_len = value.shape[dim]
        sl = _local_rows(full_len, p)
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
    if hasattr(p, "ds_id") and p.requires_grad and hasattr(p, "_z3_optimizer"):
        from deepspeed.utils import safe_get_local_fp32_param

        master = safe_get_local_fp32_param(p)
        part = p.ds_tensor.data.view(-1)[: master.numel()]
        if getattr(p, "ds_persist", False):  # kept whole on every rank: the chunk may be stale
            start = dist.get_rank(group=p.ds_process_group) * p.ds_tensor.ds_numel
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
        if getattr(weight, "ds_persist", False):  # small weights stay whole on every rank
            weight.data.copy_((weight.data.float() - b0.float() @ a0.float()).to(weight.dtype))
        flat = weight.ds_tensor.data.view(-1)
        n = a0.shape[1]
        start = dist.get_rank(group=weight.ds_process_group) * weight.ds_tensor.ds_numel
        stop = min(start + weight.ds_tensor.ds_numel, weight.ds_numel)
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
        sl = _local_rows(b0.shape[0], weight)
        delta = b0[sl].float() @ a0.float()
        local.copy_((local.float() - delta.to(local.device)).to(local.dtype))
        return
    weight.copy_((weight.float() - (b0.float() @ a0.float()).to(weight.device)).to(weight.dtype))
