"""Bytes one Riemannion step hands to each collective, predicted from the adapter shapes alone.

The same keys as ``Riemannion.last_step_comm`` (payload bytes per call, summed over the step).
Counts follow the step in :mod:`riemann_zero.manifold.span` / :mod:`riemann_zero.optim.riemannion`
(:data:`GRAM_M`, :data:`GRAM_N`, in units of r² fp64 numbers per adapter):

- m side: the drift check UᵀU (r × r) and two CholeskyQR2 passes of [U | M_U] against U
  (2 · 2r × r): 5 r²;
- n side: VᵀV, two passes of [V | M_K] and S = VᵀK: 6 r² (only where the n side is row-sharded:
  FSDP2 with lora_A on ``Shard(1)``);
- flat ZeRO layouts and FSDP2 ``Shard(0)`` lora_A: Aᵀ gathered, (2r × n) values + (r × n) K-block
  gradient, fp32;
- flat ZeRO layouts with rows cut mid-row: world × (1 + 4r) then world × 2r, fp32.

No term grows with m·n. Comparisons for the benchmark: :func:`engine_grad_bytes` (what the engine
already reduces for the adapters' gradients) and :func:`gather_factor_bytes` (a design that
all-gathers each full factor, as Muon implementations that rebuild whole matrices do).
"""

from __future__ import annotations

from collections import Counter

__all__ = ["GRAM_M", "GRAM_N", "step_bytes", "zero3_partial_rows", "engine_grad_bytes",
           "gather_factor_bytes", "tensorion_step_bytes"]

FP64, FP32 = 8, 4
GRAM_M, GRAM_N = 5, 6  # r×r blocks all-reduced per adapter and step (see the module docstring)


def zero3_partial_rows(m: int, r: int, world: int) -> bool:
    """Whether ZeRO-3's ceil(numel/world) chunks of lora_B (m × 2r) cut some row."""
    numel, cols = m * 2 * r, 2 * r
    chunk = -(-numel // world)
    return any(k * chunk % cols for k in range(world) if k * chunk < numel)


def step_bytes(shapes: list[tuple[int, int, int]], layout: str, world: int,
               partial: list[bool] | None = None) -> Counter:
    """Predicted ``last_step_comm`` of one Riemannion step.

    Args:
        shapes: (m, n, r) of every adapter.
        layout: ``"fsdp2"`` (lora_A on Shard(1) where world | n, else Shard(0)), ``"zero3"``,
            ``"zero12"``, or ``"local"``.
        world: data-parallel world size.
        partial: for ``"zero12"``, which adapters have a lora_B row cut between ranks (depends on
            DeepSpeed's flat layout); computed for ``"zero3"``; ignored otherwise.
    """
    out: Counter = Counter()
    if layout == "local" or world == 1:
        return out
    for i, (m, n, r) in enumerate(shapes):
        out["all_reduce.gram_m"] += GRAM_M * r * r * FP64
        if layout == "fsdp2" and n % world == 0:
            out["all_reduce.gram_n"] += GRAM_N * r * r * FP64
        else:
            out["all_reduce.gather_n"] += 3 * r * n * FP32
        if layout == "zero3":
            cut = zero3_partial_rows(m, r, world)
        elif layout == "zero12":
            cut = bool(partial and partial[i])
        else:
            cut = False
        if cut:
            out["all_reduce.boundary_rows"] += world * (1 + 4 * r) * FP32
            out["all_reduce.boundary_rows_back"] += world * 2 * r * FP32
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


def tensorion_step_bytes(numels: list[int], layout: str, world: int) -> Counter:
    """Predicted ``Tensorion.last_step_comm`` of one step (fp32 tensors of ``numels`` elements).

    Each tensor's owner receives the momentum as one zero-padded ``reduce`` of the whole tensor
    (skipped where every rank already holds it whole: no engine, DDP, ZeRO-0) and sends back the
    direction plus the chosen unfolding as one ``broadcast`` of numel + 1 numbers. Whole-tensor
    traffic, as every Muon that rebuilds matrices has (Tensorion's LMO needs the whole tensor).
    """
    out: Counter = Counter()
    if world == 1:
        return out
    for numel in numels:
        if layout != "local":
            out["reduce.momentum"] += numel * FP32
        out["broadcast.direction"] += (numel + 1) * FP32
    return out
