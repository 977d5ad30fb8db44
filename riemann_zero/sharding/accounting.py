"""Bytes one Riemannion step hands to each collective, predicted from the adapter shapes alone.

The same keys as ``Riemannion.last_step_comm`` (payload bytes per call, summed over the step, on
one rank: for an all-to-all, that rank's send buffer). Counts follow the step in
:mod:`riemann_zero.manifold.span` / :mod:`riemann_zero.optim.riemannion` (:data:`GRAM_M`,
:data:`GRAM_N`, in units of r² fp64 numbers per adapter) and the exchange of
:mod:`riemann_zero.sharding.exchange`:

- m side: the drift check UᵀU (r × r) and two CholeskyQR2 passes of [U | M_U] against U
  (2 · 2r × r): 5 r²;
- n side: VᵀV, two passes of [V | M_K] and S = VᵀK: 6 r² (every engine: the n side is always
  row-sharded, natively under FSDP2 with lora_A on ``Shard(1)``, by the exchange otherwise);
- ZeRO-1/2/3 and FSDP2 with lora_A on ``Shard(0)``: the exchange of flat pieces into row
  blocks, fp32 (:func:`~riemann_zero.sharding.exchange.exchange_counts`): out, this rank's
  lora_A piece, its K-block part again (gradients) and twice its leading partial lora_B row;
  back, its Aᵀ row block (2r·n_j, n_j ≈ n/world) and the part of its last lora_B row that later
  ranks hold. It depends on the rank's pieces: the layout models them from the shapes
  (:meth:`~riemann_zero.sharding.layouts.Layout.exchange_pieces`: ZeRO-3's ceil(numel/world)
  chunks, FSDP2's torch.chunk rows); they are passed in for ZeRO-1/2 (DeepSpeed's flat layout
  decides them; :func:`zero12_pieces` models it).

A layout is a :class:`~riemann_zero.sharding.layouts.Layout` or its name
(:func:`~riemann_zero.sharding.layouts.layout_named`: ``local``, ``zero12``, ``zero3``,
``fsdp2``, or an engine name such as ``zero2`` or ``ddp``).

No term grows with m·n, and none with a whole factor: the per-rank bytes fall with the world.
Comparisons for the benchmark: :func:`engine_grad_bytes` (what the engine already reduces for
the adapters' gradients) and :func:`gather_factor_bytes` (a design that all-gathers each full
factor, as Muon implementations that rebuild whole matrices do).
"""

from __future__ import annotations

from collections import Counter

from riemann_zero.sharding.exchange import chunk, exchange_counts
from riemann_zero.sharding.layouts import Layout, Span, layout_named

__all__ = ["GRAM_M", "GRAM_N", "step_bytes", "zero12_pieces", "engine_grad_bytes",
           "gather_factor_bytes", "tensorion_step_bytes"]

FP64, FP32 = 8, 4
GRAM_M, GRAM_N = 5, 6  # r×r blocks all-reduced per adapter and step (see the module docstring)


def _layout(layout: Layout | str) -> Layout:
    return layout_named(layout) if isinstance(layout, str) else layout


def zero12_pieces(shapes: list[tuple[int, int, int]], world: int, rank: int
                  ) -> list[tuple[Span, Span]]:
    """A model of ZeRO-1/2's flat layout for the benchmark: the adapters' lora_B, lora_A (in the
    optimizer's group order) concatenated and cut into ``world`` ceil-sized pieces (DeepSpeed's
    alignment padding ignored). Returns this rank's ((lora_A), (lora_B)) piece per adapter."""
    total = sum(2 * r * (m + n) for m, n, r in shapes)
    lo, hi = chunk(total, world, rank)[0], sum(chunk(total, world, rank))
    out, pos = [], 0
    for m, n, r in shapes:
        pieces = []
        for numel in (2 * r * m, 2 * r * n):  # lora_B then lora_A
            s, e = max(lo, pos), min(hi, pos + numel)
            pieces.append((s - pos, e - s) if e > s else (0, 0))
            pos += numel
        out.append((pieces[1], pieces[0]))
    return out


def step_bytes(shapes: list[tuple[int, int, int]], layout: Layout | str, world: int,
               rank: int = 0, pieces: list[tuple[Span, Span]] | None = None) -> Counter:
    """Predicted ``last_step_comm`` of one Riemannion step on one rank.

    Args:
        shapes: (m, n, r) of every adapter.
        layout: the engine's layout or its name; FSDP2 puts lora_A on Shard(1) where world | n,
            else Shard(0).
        world: data-parallel world size.
        rank: the rank whose bytes to predict (the exchange's share depends on it).
        pieces: this rank's ((start, numel) of lora_A, (start, numel) of lora_B) per adapter;
            required under ZeRO-1/2, modelled from the shapes by the other layouts.
    """
    layout = _layout(layout)
    out: Counter = Counter()
    if layout.whole or world == 1:
        return out
    if pieces is None:
        pieces = [layout.exchange_pieces(r, m, n, world, rank) for m, n, r in shapes]
    elif len(pieces) != len(shapes):
        raise ValueError(f"pieces: pass this rank's (lora_A, lora_B) pieces for each of the "
                         f"{len(shapes)} adapters, but got {len(pieces)}")
    for (_, n, r), exchanged in zip(shapes, pieces):
        out["all_reduce.gram_m"] += GRAM_M * r * r * FP64
        out["all_reduce.gram_n"] += GRAM_N * r * r * FP64
        if exchanged is None:  # the engine's own layout gives row blocks already
            continue
        there, back = exchange_counts(r, n, *exchanged, rank, world)
        out["all_to_all.exchange"] += there * FP32
        out["all_to_all.exchange_back"] += back * FP32
    return out


def engine_grad_bytes(shapes: list[tuple[int, int, int]], stage: int) -> int:
    """Payload of the engine's own gradient reduction of the adapters per step (fp32 grads of
    lora_B m×2r and lora_A 2r×n): an all-reduce (DDP, ZeRO-1) or reduce-scatter (ZeRO-2/3,
    FSDP2) of every element; ZeRO-1/2/3 and FSDP2 then all-gather the updated parameters."""
    grads = sum((m + n) * 2 * r for m, n, r in shapes) * FP32
    return grads if stage == 0 else 2 * grads


def gather_factor_bytes(shapes: list[tuple[int, int, int]], world: int) -> int:
    """Payload of a design that all-gathers full lora_B (m×2r) and lora_Aᵀ (n×2r) with their
    gradients on every rank before stepping (each rank receives the other ranks' shares)."""
    return sum(2 * (m + n) * 2 * r for m, n, r in shapes) * FP32 * (world - 1) // world


def tensorion_step_bytes(numels: list[int], layout: Layout | str, world: int) -> Counter:
    """Predicted ``Tensorion.last_step_comm`` of one step (fp32 tensors of ``numels`` elements).

    Each tensor's owner receives the momentum as one zero-padded ``reduce`` of the whole tensor
    (skipped where every rank already holds it whole: no engine, DDP, ZeRO-0) and sends back the
    direction plus the chosen unfolding as one ``broadcast`` of numel + 1 numbers. Whole-tensor
    traffic, as every Muon that rebuilds matrices has (Tensorion's LMO needs the whole tensor).
    """
    layout = _layout(layout)
    out: Counter = Counter()
    if world == 1:
        return out
    for numel in numels:
        if not layout.whole:
            out["reduce.momentum"] += numel * FP32
        out["broadcast.direction"] += (numel + 1) * FP32
    return out
