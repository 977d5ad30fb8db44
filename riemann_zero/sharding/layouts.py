"""How an engine lays a parameter out: ONE object per engine kind, chosen once per parameter.

:func:`layout_of` asks the layouts of :data:`LAYOUTS` in turn whether they ``claim`` a parameter;
the first that does is its layout. Only the layouts look at the marks an engine leaves on a
parameter (``ds_id``, ``_hp_mapping``, a DTensor); everyone else calls their verbs.

- :data:`ZERO3`, DeepSpeed ZeRO-3 (``p.ds_id``): rank k holds elements [k·c, (k+1)·c) of the
  row-major flattened tensor in ``ds_tensor``, c = ``ds_tensor.ds_numel`` (the last chunk padded);
  the fp32 master and gradient are slices of the optimizer's flat sub-group partition.
- :data:`ZERO12`, DeepSpeed ZeRO-1/2 (``p._hp_mapping``): the module tensor is whole; the fp32
  master is one piece of the param group's flat partition, cut anywhere.
- :data:`FSDP2`, a DTensor on a 1-D mesh: ``Shard(d)`` with torch.chunk's ceil-sized pieces.
- :data:`LOCAL`, everything else (no engine, ZeRO-0, one process, DDP): every rank holds the whole
  tensor with the same values. DDP needs no object of its own: it leaves parameters plain and
  whole, averages their gradients before the optimizer runs, and reduces over the default group,
  so nothing a layout answers differs from one process.

This rank's part of a parameter is its *piece* (:class:`Piece`): the elements
[start, start + numel) of the parameter's row-major flattening, with the engine's fp32 master
values of them and their gradient. Nothing here gathers a whole tensor.
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from riemann_zero.sharding.exchange import chunk

__all__ = ["Piece", "Span", "Layout", "LocalLayout", "Zero12Layout", "Zero3Layout",
           "Fsdp2Layout", "LOCAL", "ZERO12", "ZERO3", "FSDP2", "LAYOUTS", "layout_of",
           "layout_named", "stored_shape", "is_dtensor", "dtensor_rows", "zero3_chunk",
           "held_whole"]

Span = tuple[int, int]  # (start, numel) of one rank's piece of a row-major flattened tensor


@dataclass
class Piece:
    """Elements [start, start + numel) of a parameter's row-major flattening held on this rank."""

    start: int
    numel: int
    value: Tensor | None  # 1-D writable view of the master values (None when numel == 0)
    grad: Tensor | None  # 1-D gradient of those elements (None: no gradient reached them)
    whole: bool  # every rank holds the whole tensor with the same values (no engine, DDP)


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and their gradients)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


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
    size = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * size
    return start, min(start + size, p.ds_numel)


def held_whole(p: Tensor) -> bool:
    """True for a small ZeRO-3 parameter DeepSpeed keeps whole on every rank (``ds_persist``,
    below its persistence threshold) once it has gathered it, at the first forward; before that
    (right after ``zero.Init`` or ``deepspeed.initialize``) only its chunk exists."""
    return bool(getattr(p, "ds_persist", False)) and p.data.numel() == p.ds_numel


class Layout(abc.ABC):
    """How one engine kind lays parameters out, and the verbs every caller uses on them.

    Attributes:
        name: the short name of the byte model (:mod:`riemann_zero.sharding.accounting`).
        names: every name :func:`layout_named` turns into this layout (``name`` and engine names).
        title: what messages call it (``"ZeRO-1/2"``, ``"FSDP2"``, ...).
        whole: every rank holds every parameter whole, with the same values.
        flat: the engine hands the optimizer flat fp32 partitions instead of the parameters.
    """

    name: str
    names: tuple[str, ...]
    title: str
    whole: bool = False
    flat: bool = False

    def __repr__(self) -> str:
        return f"<{self.title} layout>"

    @abc.abstractmethod
    def claims(self, p: Tensor) -> bool:
        """Whether parameter p carries this engine's marks (asked in :data:`LAYOUTS` order)."""

    def shape(self, p: Tensor) -> tuple[int, ...]:
        """The full (logical) shape of p, whatever this rank stores."""
        return tuple(p.shape)

    def group(self, p: Tensor):
        """The data-parallel process group the engine shards p over (None: the default group)."""
        return None

    def values(self, p: Tensor) -> Tensor:
        """The module values of p stored on this rank, without communication."""
        return p

    def storage(self, p: Tensor) -> list[tuple[int, Tensor]]:
        """(start, flat view) of every module tensor on this rank that stores elements of p's
        row-major flattening (the view holds elements [start, start + numel)); the engine's
        fp32 master is not among them. Writing these views writes p's module values."""
        return [(0, p.data.view(-1))]

    @abc.abstractmethod
    def piece(self, p: Tensor, flat: Tensor | None = None) -> Piece:
        """This rank's piece of p: its elements' fp32 master values (writable) and gradient.

        Args:
            p: the model parameter (as the engine laid it out).
            flat: under ZeRO-1/2, the flat fp32 partition the optimizer is stepping now (its
                ``.grad`` is the averaged gradient); ignored elsewhere.
        """

    def in_partition(self, p: Tensor, flat: Tensor) -> bool:
        """Whether p's fp32 master lives in ``flat``, the partition the engine is stepping now
        (only ZeRO-3 steps one sub-group of a param group at a time)."""
        return True

    @abc.abstractmethod
    def write(self, p: Tensor, value: Tensor) -> None:
        """Write this rank's part of the full ``value`` (the same on every rank) into p's module
        values and into the engine's fp32 master of them; no communication."""

    def refresh(self, p: Tensor) -> None:
        """Copy p's module values into the engine's fp32 master of them, after they were written
        outside the optimizer (no master: nothing to do)."""
        return None

    def visible(self, params: list[Tensor], modify: bool) -> contextlib.AbstractContextManager:
        """A context in which the full values of ``params`` (all of this layout) can be read,
        and with ``modify`` written; the module values are then re-partitioned on exit."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def exchange_pieces(self, r: int, m: int, n: int, world: int, rank: int
                        ) -> tuple[Span, Span | None] | None:
        """For the byte model: this rank's pieces of lora_A (2r × n) and lora_B (m × 2r) that
        the manifold step's exchange turns into row blocks (lora_B None: its rows are whole
        here; None: no exchange), from the shapes alone."""


class LocalLayout(Layout):
    """No engine, ZeRO-0, one process, DDP: plain whole tensors, the same on every rank."""

    name, names, title, whole = "local", ("local", "ddp", "zero0"), "no engine / DDP", True

    def claims(self, p: Tensor) -> bool:
        return True

    def piece(self, p: Tensor, flat: Tensor | None = None) -> Piece:
        grad = None if p.grad is None else p.grad.reshape(-1)
        return Piece(0, p.numel(), p.data.view(-1), grad, whole=self.whole)

    @torch.no_grad()
    def write(self, p: Tensor, value: Tensor) -> None:
        p.data.copy_(value.to(p.dtype))

    def exchange_pieces(self, r: int, m: int, n: int, world: int, rank: int) -> None:
        return None


class Zero12Layout(Layout):
    """DeepSpeed ZeRO-1/2: the module tensor is whole on every rank; its fp32 master is the
    piece ``p._hp_mapping`` of the param group's flat partition (None: this rank holds none of
    it), which DeepSpeed cuts anywhere."""

    name, names, title, flat = "zero12", ("zero12", "zero1", "zero2"), "ZeRO-1/2", True

    def claims(self, p: Tensor) -> bool:
        return hasattr(p, "_hp_mapping")

    def group(self, p: Tensor):
        return getattr(p, "_dp_group", None)

    def piece(self, p: Tensor, flat: Tensor | None = None) -> Piece:
        hp = p._hp_mapping
        if hp is None:
            return Piece(0, 0, None, None, whole=False)
        value = hp.hp_fragment
        if flat is None or value.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            raise ValueError("ZeRO-1/2: a parameter is mapped into another param group than the "
                             "one being stepped; keep each param group as the optimizer built it "
                             "(adapters in the optimizer's group 0)")
        numel = hp.lp_fragment_address.numel
        grad = None if flat.grad is None else flat.grad.narrow(0, hp.hp_fragment_address.start,
                                                               numel)
        return Piece(hp.lp_fragment_address.start, numel, value.view(-1), grad, whole=False)

    @torch.no_grad()
    def write(self, p: Tensor, value: Tensor) -> None:
        p.data.copy_(value.to(p.dtype))
        hp = p._hp_mapping
        if hp is not None:
            addr = hp.lp_fragment_address
            hp.hp_fragment.data.copy_(value.reshape(-1)[addr.start: addr.start + addr.numel])

    @torch.no_grad()
    def refresh(self, p: Tensor) -> None:
        if p._hp_mapping is not None:
            p._hp_mapping.update_hp()

    def exchange_pieces(self, r: int, m: int, n: int, world: int, rank: int) -> None:
        raise ValueError("ZeRO-1/2: DeepSpeed's flat layout of the whole param group decides each "
                         "rank's pieces, not one adapter's shape; pass this rank's (lora_A, "
                         "lora_B) pieces per adapter (zero12_pieces models them)")


class Zero3Layout(Layout):
    """DeepSpeed ZeRO-3: this rank's ``ds_tensor`` chunk of the row-major flattening; the fp32
    master and gradient are slices of the optimizer's flat sub-group partition."""

    name, names, title, flat = "zero3", ("zero3",), "ZeRO-3", True

    def claims(self, p: Tensor) -> bool:
        return hasattr(p, "ds_id")

    def shape(self, p: Tensor) -> tuple[int, ...]:
        return tuple(p.ds_shape)

    def group(self, p: Tensor):
        return p.ds_process_group

    def values(self, p: Tensor) -> Tensor:
        return p.ds_tensor

    def storage(self, p: Tensor) -> list[tuple[int, Tensor]]:
        start, stop = zero3_chunk(p)
        held = [(0, p.data.view(-1))] if held_whole(p) else []  # small: whole on every rank
        if stop > start:
            held.append((start, p.ds_tensor.data.view(-1)[: stop - start]))
        return held

    @staticmethod
    def _partition(p: Tensor) -> tuple[Tensor, int]:
        """(the flat fp32 sub-group partition that holds p's master, p's offset in it)."""
        opt = p._z3_optimizer
        gid, offset, _ = opt.grad_position[opt.get_param_id(p)]
        return opt.fp32_partitioned_groups_flat[gid], offset

    def piece(self, p: Tensor, flat: Tensor | None = None) -> Piece:
        part, offset = self._partition(p)
        start, stop = zero3_chunk(p)
        numel = max(0, stop - start)
        if numel == 0:
            return Piece(start, 0, None, None, whole=False)
        grad = None if part.grad is None else part.grad.narrow(0, offset, numel)
        return Piece(start, numel, part.narrow(0, offset, numel), grad, whole=False)

    def in_partition(self, p: Tensor, flat: Tensor) -> bool:
        ptr = flat.untyped_storage().data_ptr()
        return self._partition(p)[0].untyped_storage().data_ptr() == ptr

    @staticmethod
    def _master(p: Tensor) -> Tensor | None:
        """The optimizer's fp32 partition of trainable p (None: no engine owns it)."""
        if not (p.requires_grad and hasattr(p, "_z3_optimizer")):
            return None
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)

    @torch.no_grad()
    def write(self, p: Tensor, value: Tensor) -> None:
        start, _ = zero3_chunk(p)
        part = value.reshape(-1).to(p.ds_tensor.dtype)[start: start + p.ds_tensor.ds_numel]
        p.ds_tensor.data.view(-1)[: part.numel()].copy_(part)
        if held_whole(p):  # small parameters stay whole on every rank
            p.data.copy_(value.reshape(p.shape).to(p.dtype))
        master = self._master(p)
        if master is not None:
            master.view(-1)[: part.numel()].copy_(part)

    @torch.no_grad()
    def refresh(self, p: Tensor) -> None:
        master = self._master(p)
        if master is None:
            return
        part = p.ds_tensor.data.view(-1)[: master.numel()]
        if held_whole(p):  # kept whole on every rank: the chunk may be stale
            start, _ = zero3_chunk(p)
            whole = p.data.view(-1)[start: start + part.numel()]
            part[: whole.numel()].copy_(whole)
        master.copy_(part.to(master.dtype))

    def visible(self, params: list[Tensor], modify: bool) -> contextlib.AbstractContextManager:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def exchange_pieces(self, r: int, m: int, n: int, world: int, rank: int
                        ) -> tuple[Span, Span]:
        return chunk(2 * r * n, world, rank), chunk(2 * r * m, world, rank)


class Fsdp2Layout(Layout):
    """FSDP2: a DTensor on a 1-D mesh, ``Shard(d)`` in torch.chunk's ceil-sized pieces; this
    rank's values are its local tensor."""

    name, names, title = "fsdp2", ("fsdp2",), "FSDP2"

    def claims(self, p: Tensor) -> bool:
        return is_dtensor(p)

    def group(self, p: Tensor):
        return p.device_mesh.get_group()

    def values(self, p: Tensor) -> Tensor:
        return p.to_local()

    def storage(self, p: Tensor) -> list[tuple[int, Tensor]]:
        if tuple(pl.dim for pl in p.placements if hasattr(pl, "dim")) != (0,):
            raise ValueError(f"FSDP2 stores a {tuple(p.shape)} parameter as {p.placements}, but "
                             f"a range of its row-major flattening is stored on one rank only "
                             f"under Shard(0) (FSDP2's default)")
        rows = dtensor_rows(p.shape[0], p)
        return [(rows.start * math.prod(p.shape[1:]), p.to_local().view(-1))]

    def piece(self, p: Tensor, flat: Tensor | None = None) -> Piece:
        from torch.distributed.tensor import Shard

        if tuple(p.placements) != (Shard(0),):
            raise ValueError(f"FSDP2 placement {tuple(p.placements)} of a {tuple(p.shape)} "
                             f"parameter: whole-tensor optimizers need Shard(0) (FSDP2's default)")
        rows = dtensor_rows(p.shape[0], p)
        inner = math.prod(p.shape[1:]) if p.shape[0] else 0
        local = p.to_local()
        grad = None if p.grad is None else p.grad.to_local().reshape(-1)
        return Piece(rows.start * inner, (rows.stop - rows.start) * inner, local.view(-1), grad,
                     whole=False)

    @torch.no_grad()
    def write(self, p: Tensor, value: Tensor) -> None:
        local = p.to_local()
        dim = p.placements[0].dim
        rows = dtensor_rows(value.shape[dim], p)
        local.copy_(value.narrow(dim, rows.start, rows.stop - rows.start).to(local.dtype))

    def exchange_pieces(self, r: int, m: int, n: int, world: int, rank: int
                        ) -> tuple[Span, None] | None:
        if n % world == 0:  # lora_A on Shard(1) (fsdp_placement): row blocks of Aᵀ already
            return None
        return chunk(2 * r * n, world, rank, unit=n), None  # Shard(0): torch.chunk of the rows


LOCAL, ZERO12, ZERO3, FSDP2 = LocalLayout(), Zero12Layout(), Zero3Layout(), Fsdp2Layout()
LAYOUTS: tuple[Layout, ...] = (ZERO3, ZERO12, FSDP2, LOCAL)  # asked in this order


def layout_of(p: Tensor) -> Layout:
    """How an engine laid out parameter p: the first layout of :data:`LAYOUTS` that claims it."""
    return next(layout for layout in LAYOUTS if layout.claims(p))


def layout_named(name: str) -> Layout:
    """The layout called ``name`` (a layout's ``name``, or an engine name such as ``"zero2"``)."""
    for layout in LAYOUTS:
        if name in layout.names:
            return layout
    known = ", ".join(repr(n) for layout in LAYOUTS for n in layout.names)
    raise ValueError(f"layout must be one of {known}, but got {name!r}")


def stored_shape(p: Tensor) -> tuple[int, ...]:
    """The full shape of parameter p, whatever its layout (ZeRO-3 keeps it in ``ds_shape``)."""
    return layout_of(p).shape(p)
