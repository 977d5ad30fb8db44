"""Fixed-rank adapters in batches: which adapters are stepped together, and how a batch's point and
gradient are read from (and the new point written back to) this rank's rows.

The base optimizer (:class:`riemann_zero.optim.base.ManifoldOptimizer`) steps its ``"manifold"``
groups one bucket at a time through these functions; the algorithm of one bucket is the
subclass's ``_update``. Everything here is the same on 1..N ranks: rows come and go through the
sharding layer's ``read``/``write``, sums over rows through its ``reduce_m``/``reduce_n``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from riemann_zero.adapters.layout import Adapter
from riemann_zero.linalg import orthonormalize, reduce_sum
from riemann_zero.manifold import fixed_rank as geo
from riemann_zero.manifold import span

__all__ = ["CPU_BUCKET_BYTES", "cut_buckets", "read_bucket", "write_bucket", "bucket_health"]

# Cap on one batched call's factor bytes for CPU parameters: stacked temporaries past a few MiB
# fall out of cache and cost more than the Python loop saves (bench/overhead.py).
CPU_BUCKET_BYTES = 16 << 20


def cut_buckets(adapters: list[Adapter], by_shape: bool, cap: int | None
                ) -> list[list[Adapter]]:
    """Same-shaped adapters together (``by_shape=False``: one adapter per bucket), cut into calls
    of at most ``cap`` factor bytes (``None``: no cap).

    Cuts depend on the global shapes only, so every rank forms the same buckets.
    """
    groups: dict[tuple | str, list[Adapter]] = defaultdict(list)
    for ad in adapters:
        groups[(ad.m, ad.n, ad.r) if by_shape else ad.name].append(ad)
    out = []
    for bucket in groups.values():
        ad = bucket[0]
        calls = -(-len(bucket) * 4 * (ad.m + ad.n) * ad.r // cap) if cap else 1
        per = -(-len(bucket) // calls)  # even cuts: 32 → 16 + 16, not 27 + 5
        out += [bucket[i: i + per] for i in range(0, len(bucket), per)]
    return out


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _canonical(x: geo.Point, shards) -> geo.Point:
    """Re-factor a point first read from low-precision (bf16/fp16) parameters.

    Rounded to bf16, U is orthonormal only to ~1e-3 and V no longer spans range K; every later
    step would inherit both (the geometry assumes them). The point the model computes with,
    X̃ = Ũ K̃ᵀ, is kept: Ũ = Q R gives U = Q, K = K̃ Rᵀ, and a zero-step retraction re-derives an
    orthonormal V spanning range K with K = V Σ.
    """
    rm, rn = shards.reduce_m, shards.reduce_n
    q, rr, _, _ = orthonormalize(x.U, None, rm)
    v = orthonormalize(x.V, None, rn)[0]
    start = geo.Point(q, v, x.K @ rr.mT.to(x.K.dtype))
    zero = geo.Tangent(torch.zeros_like(start.U), torch.zeros_like(start.K))
    return geo.retract(start, zero, 1.0, rm, rn)


def _check_state_rows(bucket: list[Adapter], states: list[dict], rows_m: int, rows_n: int
                      ) -> None:
    """After a load: the per-adapter tangent states (``*_U`` over this rank's m-side rows, ``*_K``
    over its n-side rows) must have the rows this rank steps now, else the checkpoint was written
    for another layout and stepping would fail deep inside the geometry (or mix rows)."""
    for ad, st in zip(bucket, states):
        for key, value in st.items():
            want = rows_m if key.endswith("_U") else rows_n if key.endswith("_K") else None
            if (want is not None and isinstance(value, Tensor) and value.dim() >= 2
                    and value.shape[-2] != want):  # (scalar second moments have no rows)
                raise ValueError(
                    f"optimizer state {key!r} of adapter {ad.name} holds {value.shape[-2]} rows, "
                    f"but this rank steps {want}: the checkpoint was written for another layout "
                    f"(another world size or engine, or before ZeRO's n-side all-to-all exchange, "
                    f"which changed the rows a rank keeps); resume with the world size and "
                    f"version that wrote it, or start the run again in a new output_dir")


def read_bucket(bucket: list[Adapter], states: list[dict], shards, check_rows: bool
                ) -> tuple[geo.Point, Tensor, Tensor, list[int], list[int]]:
    """The bucket's point X = U Kᵀ (orthonormal U, V; re-factored once after low-precision
    parameters), the gradient blocks G V (m side) and Gᵀ U (n side), stacked and padded to the
    largest row count, and each adapter's m- and n-side row counts on this rank.

    ``check_rows``: first step after a load, check that the state has this rank's rows. Marks
    ``states`` ``canonical`` once the point has been re-factored.
    """
    r = bucket[0].r
    reads = [shards.read(ad, st) for ad, st in zip(bucket, states)]
    rows_m = [rd[0].shape[0] for rd in reads]
    rows_n = [rd[2].shape[0] for rd in reads]
    if check_rows:
        _check_state_rows(bucket, states, max(rows_m), max(rows_n))
    dtype = torch.float64 if reads[0][0].dtype == torch.float64 else torch.float32

    def stack(i: int, cols: slice, rows: list[int]) -> Tensor:  # only the r-wide halves used
        return torch.stack([_pad_rows(rd[i][:, cols].to(dtype), max(rows)) for rd in reads])

    first, last = slice(0, r), slice(r, 2 * r)
    x = geo.Point(stack(0, last, rows_m), stack(2, first, rows_n), stack(2, last, rows_n))
    x = span.restore_orthonormality(x, shards.reduce_m, shards.reduce_n)
    g_u, g_k = stack(1, first, rows_m), stack(3, last, rows_n)
    if bucket[0].lora_B.dtype not in (torch.float32, torch.float64) and not all(
            "canonical" in st for st in states):
        x = _canonical(x, shards)
        for st in states:
            st["canonical"] = True
    return x, g_u, g_k, rows_m, rows_n


def write_bucket(bucket: list[Adapter], states: list[dict], shards, new: geo.Point,
                 rows_m: list[int], rows_n: list[int]) -> None:
    """Write the new point back as lora_B = [0 | U], lora_A = [Vᵀ ; Kᵀ], this rank's rows."""
    b_new = torch.cat([torch.zeros_like(new.U), new.U], dim=-1)
    at_new = torch.cat([new.V, new.K], dim=-1)
    for i, (ad, st) in enumerate(zip(bucket, states)):
        shards.write(ad, st, b_new[i, : rows_m[i]], at_new[i, : rows_n[i]])


def bucket_health(bucket: list[Adapter], states: list[dict], shards
                  ) -> tuple[float, float, float, list[float]]:
    """max ‖UᵀU − I‖_F, max ‖VᵀV − I‖_F, max ‖Z‖_F and every ‖X‖_F (= ‖K‖_F) of one bucket.

    Collective under an engine: one reduction of the stacked 2r×2r Grams BᵀB and AAᵀ (which hold
    UᵀU, ZᵀZ, VᵀV and KᵀK).
    """
    r = bucket[0].r
    reads = [shards.read(ad, st) for ad, st in zip(bucket, states)]
    gb = torch.stack([(b.mT @ b).double() for b, _, _, _ in reads])  # [Z U]ᵀ[Z U]
    ga = torch.stack([(at.mT @ at).double() for _, _, at, _ in reads])  # [V K]ᵀ[V K]
    if shards.reduce_n is None:  # n side whole on every rank: only the m side sums
        gb = reduce_sum(gb, shards.reduce_m)
    else:  # both sides split over the same ranks: one reduction serves both
        both = reduce_sum(torch.cat([gb, ga]), shards.reduce_m)
        gb, ga = both[: len(bucket)], both[len(bucket):]
    eye = torch.eye(r, dtype=torch.float64, device=gb.device)
    orth_u = float((gb[:, r:, r:] - eye).norm(dim=(-2, -1)).max())
    orth_v = float((ga[:, :r, :r] - eye).norm(dim=(-2, -1)).max())
    trace = torch.diagonal(gb[:, :r, :r], dim1=-2, dim2=-1).sum(-1)
    z_norm = float(trace.clamp_min(0).sqrt().max())
    trace_k = torch.diagonal(ga[:, r:, r:], dim1=-2, dim2=-1).sum(-1)
    return orth_u, orth_v, z_norm, trace_k.clamp_min(0).sqrt().tolist()
