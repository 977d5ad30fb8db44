"""Geometry of the manifold of rank-r matrices, in factored form, batched over adapters.

A point is X = U Kᵀ with U (m×r) orthonormal, K (n×r) free and V (n×r) an orthonormal basis of
range K. A tangent vector is ξ = U̇ Vᵀ + U K̇ᵀ with Uᵀ U̇ = 0. Every tensor carries a leading batch
dimension b (all adapters of one shape are moved in one call); no m×n matrix is ever formed.

Sharding: m-side tensors (U, U̇, gradients G V) and n-side tensors (V, K, K̇, Gᵀ U) may be row
blocks of the full factors. Every tall-matrix operation is written as local matmul → sum of a
small (r×r or 2r×r) product over row blocks → local matmul; the sums go through ``reduce_m`` /
``reduce_n`` (an all-reduce across the ranks holding the rows, or ``None`` for a single process).
Rows of padding must be zero; zero rows do not change any sum.

Precision: tall products run in the dtype of the inputs (fp32 or fp64); Grams, cores, their
eigen/singular decompositions run in fp64 (they are tiny). The small linear algebra itself
(Grams, CholeskyQR2, Newton–Schulz) lives in :mod:`riemann_zero.linalg`.

These are the readable primitives and the specification of the fused step in
:mod:`riemann_zero.manifold.span`, which the optimizers call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from riemann_zero.linalg import (
    Reduce,
    complete,
    gram,
    mm,
    ns_polar,
    orthonormalize,
    reduce_sum,
)

__all__ = [
    "Point",
    "Tangent",
    "Reduce",
    "rgrad",
    "project",
    "transport",
    "ortho",
    "retract",
    "tangent_svd",
    "inner",
    "scale",
    "add",
    "NULL_RTOL",
    "Truncated",
    "truncated_sum",
]

# Singular values below NULL_RTOL·σ_max of a retracted matrix are treated as exact zeros (rank < r).
NULL_RTOL = 1e-12


class Point(NamedTuple):
    """X = U Kᵀ; V spans range K. Shapes (b, m, r), (b, n, r), (b, n, r)."""

    U: Tensor
    V: Tensor
    K: Tensor


class Tangent(NamedTuple):
    """ξ = dU Vᵀ + U dKᵀ at some point, with Uᵀ dU = 0. Shapes (b, m, r), (b, n, r)."""

    dU: Tensor
    dK: Tensor


def scale(xi: Tangent, c: float | Tensor) -> Tangent:
    """c·ξ (c a float or a per-adapter (b,) tensor)."""
    if isinstance(c, Tensor):
        c = c.to(xi.dU.dtype).view(-1, 1, 1)
    return Tangent(xi.dU * c, xi.dK * c)


def add(a: Tangent, b: Tangent) -> Tangent:
    return Tangent(a.dU + b.dU, a.dK + b.dK)


def inner(a: Tangent, b: Tangent, reduce_m: Reduce = None, reduce_n: Reduce = None) -> Tensor:
    """⟨a, b⟩_F per adapter, (b,) in fp64. The two blocks are orthogonal, so it splits."""
    tu = reduce_sum((a.dU.double() * b.dU.double()).sum((-2, -1)), reduce_m)
    tk = reduce_sum((a.dK.double() * b.dK.double()).sum((-2, -1)), reduce_n)
    return tu + tk


def rgrad(x: Point, g_u: Tensor, g_k: Tensor, reduce_m: Reduce = None) -> Tangent:
    """Riemannian gradient from g_u = G V and g_k = Gᵀ U: dU = (I − UUᵀ) G V, dK = Gᵀ U."""
    return Tangent(g_u - mm(x.U, gram(x.U, g_u, reduce_m)), g_k)


def project(x: Point, p: Tensor, q: Tensor, reduce_m: Reduce = None,
            reduce_n: Reduce = None) -> Tangent:
    """Orthogonal projection of Z = P Qᵀ (P (b,m,k), Q (b,n,k)) onto the tangent space at x.

    dU = (P − U UᵀP)(QᵀV), dK = Q (PᵀU). Cost O((m+n) k r).
    """
    utp = gram(x.U, p, reduce_m)  # r×k
    qtv = gram(q, x.V, reduce_n)  # k×r
    du = mm(p, qtv) - mm(x.U, utp @ qtv)
    dk = mm(q, utp.mT)
    return Tangent(du, dk)


def transport(old: Point, xi: Tangent, new: Point, reduce_m: Reduce = None,
              reduce_n: Reduce = None) -> Tangent:
    """Vector transport by projection: ξ at ``old`` (as the matrix dU V₀ᵀ + U₀ dKᵀ) onto T_new."""
    p = torch.cat([xi.dU, old.U], dim=-1)
    q = torch.cat([old.V, xi.dK], dim=-1)
    return project(new, p, q, reduce_m, reduce_n)


def tangent_svd(u: Tensor, v: Tensor, a: Tensor, bmat: Tensor, reduce_m: Reduce = None,
                reduce_n: Reduce = None, rank: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of M = A Vᵀ + U Bᵀ (U, V orthonormal; A m×r, B n×r), rank ≤ 2r.

    [A U] = [Qa U]·[[Ra, 0], [Ca, I]] and [V B] = [V Qb]·[[I, Cb], [0, Rb]] reduce M to a 2r×2r
    core [[Ra, 0], [Ca + Cbᵀ, Rbᵀ]] whose SVD W Σ Zᵀ gives M = ([Qa U] W) Σ ([V Qb] Z)ᵀ.
    Returns left (b,m,k), sigma (b,k) descending in fp64, right (b,n,k) with k = 2r, or k = r when
    ``rank`` = r is asked (then null directions are completed so left/right stay orthonormal).
    """
    r = u.shape[-1]
    qa, ra, ca, keep_a = orthonormalize(a, u, reduce_m)
    qb, rb, cb, keep_b = orthonormalize(bmat, v, reduce_n)
    core = torch.zeros(u.shape[0], 2 * r, 2 * r, dtype=torch.float64, device=u.device)
    core[:, :r, :r] = ra
    core[:, r:, :r] = ca + cb.mT
    core[:, r:, r:] = rb.mT
    w, sigma, zt = torch.linalg.svd(core)
    z = zt.mT
    if rank is not None:
        w, z, sigma = w[..., :rank], z[..., :rank], sigma[..., :rank]
        good = sigma > NULL_RTOL * sigma[:, :1]
        if not bool(good.all()):
            ones = torch.ones_like(keep_a)
            w = complete(w, torch.cat([keep_a, ones], -1), good)
            z = complete(z, torch.cat([ones, keep_b], -1), good)
            sigma = sigma * good
    left = mm(torch.cat([qa, u], dim=-1), w)
    right = mm(torch.cat([v, qb], dim=-1), z)
    return left, sigma, right


def ortho(x: Point, xi: Tangent, eps: float = 1e-6, method: str = "svd", ns_steps: int = 5,
          reduce_m: Reduce = None, reduce_n: Reduce = None) -> tuple[Tensor, Tensor]:
    """Polar factor of the tangent vector ξ (Muon's LMO), as factors P Qᵀ (b,m,2r), (b,n,2r).

    ``method="svd"`` (default, the paper's): exact, with directions σ < eps·σ_max dropped so that a
    zero or rank-deficient ξ gives zeros, not noise. ``"newton_schulz"``: NS on the 2r×2r core.
    """
    if method == "svd":
        left, sigma, right = tangent_svd(x.U, x.V, xi.dU, xi.dK, reduce_m, reduce_n)
        keep = sigma > eps * sigma[:, :1].clamp_min(1e-300)
        return left * keep.to(left.dtype).unsqueeze(-2), right
    if method == "newton_schulz":
        r = x.U.shape[-1]
        qa, ra, ca, _ = orthonormalize(xi.dU, x.U, reduce_m)
        qb, rb, cb, _ = orthonormalize(xi.dK, x.V, reduce_n)
        core = torch.zeros(x.U.shape[0], 2 * r, 2 * r, dtype=torch.float64, device=x.U.device)
        core[:, :r, :r], core[:, r:, :r], core[:, r:, r:] = ra, ca + cb.mT, rb.mT
        polar = ns_polar(core, ns_steps)
        return mm(torch.cat([qa, x.U], dim=-1), polar), torch.cat([x.V, qb], dim=-1)
    raise ValueError(f"ortho method must be 'svd' or 'newton_schulz', but got {method!r}")


def retract(x: Point, step: Tangent, decay: float | Tensor = 1.0, reduce_m: Reduce = None,
            reduce_n: Reduce = None) -> Point:
    """Truncated-SVD retraction: the best rank-r approximation of decay·X + ξ.

    decay·X + ξ = dU Vᵀ + U (decay·K + dK)ᵀ, rank ≤ 2r; the new point is U = left[:, :r],
    V = right[:, :r], K = V Σ_r.
    """
    r = x.U.shape[-1]
    if isinstance(decay, Tensor):
        decay = decay.to(x.K.dtype).view(-1, 1, 1)
    left, sigma, right = tangent_svd(x.U, x.V, step.dU, decay * x.K + step.dK, reduce_m, reduce_n,
                                     rank=r)
    return Point(left, right, right * sigma.to(right.dtype).unsqueeze(-2))


class Truncated(NamedTuple):
    """Best rank-R approximation U diag(s) Vᵀ of a sum of low-rank terms, batched over layers.

    U (b,m,R), V (b,n,R) orthonormal (columns past the sum's rank are zero), s (b,R) descending
    in fp64; ``norm`` (b,) is the Frobenius norm of the whole sum (before truncation).
    """

    U: Tensor
    s: Tensor
    V: Tensor
    norm: Tensor


def truncated_sum(left: Tensor, right: Tensor, rank: int) -> Truncated:
    """Best rank-``rank`` approximation of Z = left · rightᵀ without forming the m×n matrix Z.

    ``left`` (b,m,k) stacks the weighted, scaled B factors [w₁s₁B₁ … w_ks_kB_k] of the terms,
    ``right`` (b,n,k) the [A₁ᵀ … A_kᵀ]; zero columns (padding, absent terms) change nothing.
    Householder QR of each (left = Q_l R_l, right = Q_r R_r; robust when the columns are
    dependent, e.g. a term merged with itself), SVD of the small core R_l R_rᵀ = W Σ Hᵀ, and
    Z = (Q_l W) Σ (Q_r H)ᵀ. Cost O((m + n) k² + k³) per layer in fp64. The result depends on Z
    only, not on how each term is factored: (B S, S⁻¹ A) gives the same Z, hence the same answer
    (up to the sign/rotation freedom of repeated singular values).
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, but got {rank}")
    ql, rl = torch.linalg.qr(left.double())
    qr_, rr = torch.linalg.qr(right.double())
    w, sigma, ht = torch.linalg.svd(rl @ rr.mT, full_matrices=False)
    norm = sigma.norm(dim=-1)
    keep = min(rank, sigma.shape[-1])
    u = ql @ w[..., :keep]
    v = qr_ @ ht[..., :keep, :].mT
    s = sigma[..., :keep]
    if keep < rank:  # the sum has fewer directions than asked: pad with zero columns
        pad = rank - keep
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], pad)], dim=-1)
        v = torch.cat([v, v.new_zeros(*v.shape[:-1], pad)], dim=-1)
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], pad)], dim=-1)
    return Truncated(u, s, v, norm)
