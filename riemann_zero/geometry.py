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
eigen/singular decompositions run in fp64 (they are tiny).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

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
    "NS_COEFFS",
    "GRAM_RTOL",
    "NULL_RTOL",
]

Reduce = Callable[[Tensor], Tensor] | None

# Quintic Newton–Schulz coefficients from Muon (Keller Jordan, KellerJordan/Muon muon.py).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Directions of a tall block whose Gram eigenvalue is below GRAM_RTOL·‖block‖_F² are treated as zero
# (σ ratio ≈ 3e-7: below what an fp32 factor resolves; the fp64 Gram itself is exact to ~1e-16).
GRAM_RTOL = 1e-13
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


def _sum(t: Tensor, reduce: Reduce) -> Tensor:
    return t if reduce is None else reduce(t)


def _gram(a: Tensor, b: Tensor, reduce: Reduce) -> Tensor:
    """aᵀ b summed over row blocks, returned in fp64.

    The product runs in the inputs' dtype (upcasting a tall fp32 block costs more than the whole
    step); in fp32 the two-pass orthonormalisation below still reaches ~1e-7 orthogonality.
    """
    return _sum((a.mT @ b).double(), reduce)


def _mm(a: Tensor, small: Tensor) -> Tensor:
    """Tall (b, rows, k) times small (b, k, l), in the tall tensor's dtype."""
    return a @ small.to(a.dtype)


def scale(xi: Tangent, c: float | Tensor) -> Tangent:
    """c·ξ (c a float or a per-adapter (b,) tensor)."""
    if isinstance(c, Tensor):
        c = c.to(xi.dU.dtype).view(-1, 1, 1)
    return Tangent(xi.dU * c, xi.dK * c)


def add(a: Tangent, b: Tangent) -> Tangent:
    return Tangent(a.dU + b.dU, a.dK + b.dK)


def inner(a: Tangent, b: Tangent, reduce_m: Reduce = None, reduce_n: Reduce = None) -> Tensor:
    """⟨a, b⟩_F per adapter, (b,) in fp64. The two blocks are orthogonal, so it splits."""
    tu = _sum((a.dU.double() * b.dU.double()).sum((-2, -1)), reduce_m)
    tk = _sum((a.dK.double() * b.dK.double()).sum((-2, -1)), reduce_n)
    return tu + tk


def rgrad(x: Point, g_u: Tensor, g_k: Tensor, reduce_m: Reduce = None) -> Tangent:
    """Riemannian gradient from g_u = G V and g_k = Gᵀ U: dU = (I − UUᵀ) G V, dK = Gᵀ U."""
    return Tangent(g_u - _mm(x.U, _gram(x.U, g_u, reduce_m)), g_k)


def project(x: Point, p: Tensor, q: Tensor, reduce_m: Reduce = None,
            reduce_n: Reduce = None) -> Tangent:
    """Orthogonal projection of Z = P Qᵀ (P (b,m,k), Q (b,n,k)) onto the tangent space at x.

    dU = (P − U UᵀP)(QᵀV), dK = Q (PᵀU). Cost O((m+n) k r).
    """
    utp = _gram(x.U, p, reduce_m)  # r×k
    qtv = _gram(q, x.V, reduce_n)  # k×r
    du = _mm(p, qtv) - _mm(x.U, utp @ qtv)
    dk = _mm(q, utp.mT)
    return Tangent(du, dk)


def transport(old: Point, xi: Tangent, new: Point, reduce_m: Reduce = None,
              reduce_n: Reduce = None) -> Tangent:
    """Vector transport by projection: ξ at ``old`` (as the matrix dU V₀ᵀ + U₀ dKᵀ) onto T_new."""
    p = torch.cat([xi.dU, old.U], dim=-1)
    q = torch.cat([old.V, xi.dK], dim=-1)
    return project(new, p, q, reduce_m, reduce_n)


def _orthonormalize(a: Tensor, basis: Tensor | None, reduce: Reduce
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a = basis·C + Q·R with Q orthonormal and ⊥ basis, by Gram eigendecompositions.

    Two passes (as CholeskyQR2) restore orthogonality lost to the squared condition number. Rank
    deficient directions get zero columns in Q and zero rows in R (no NaN, no noise amplified).
    Returns Q (same shape as a), R (b,k,k), C (b,r,k) (empty if basis is None) and the (b,k) mask
    of the columns of Q that are real (not zeroed). Collectives: two small reductions.
    """
    b, _, k = a.shape
    c = a.new_zeros(b, 0 if basis is None else basis.shape[-1], k, dtype=torch.float64)
    r = torch.eye(k, dtype=torch.float64, device=a.device).expand(b, k, k)
    q = a
    for _ in range(2):
        if basis is None:
            gram = _gram(q, q, reduce)
            coef = None
            scale = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1, keepdim=True)
        else:
            both = _sum(torch.cat([basis.mT @ q, q.mT @ q], dim=-2).double(), reduce)  # one reduce
            coef, gram = both[:, : basis.shape[-1]], both[:, basis.shape[-1]:]
            # Rank tests are relative to ‖q‖² BEFORE the basis part is removed: if q lies in
            # span(basis) (always when basis is square, r = n), the residual is rounding noise
            # and must be dropped, which a test relative to the residual's own λ_max never does.
            scale = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1, keepdim=True)
            gram = gram - coef.mT @ coef  # (q − basis·coef)ᵀ(q − basis·coef), basis orthonormal
            q = torch.baddbmm(q, basis, coef.to(q.dtype), alpha=-1.0)
            c = c + coef @ r
        lam, vec = torch.linalg.eigh((gram + gram.mT) / 2)
        keep = lam > GRAM_RTOL * scale.clamp_min(1e-300)
        root = lam.clamp_min(0).sqrt()
        inv = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
        q = _mm(q, vec * inv.unsqueeze(-2))
        r = (torch.where(keep, root, 0.0).unsqueeze(-1) * vec.mT) @ r
    # Masked directions stay masked in the second pass (their Gram rows are zero), so this ``keep``
    # marks the non-zero columns of q.
    return q, r, c, keep


def _complete(w: Tensor, valid: Tensor, good: Tensor) -> Tensor:
    """Columns of w (b,2r,r) with a zero singular value are arbitrary null vectors and may point at
    zeroed basis columns. Replace them by an orthonormal completion inside the ``valid``
    coordinates, so the new factor stays orthonormal when the retracted matrix has rank < r.
    Rare path."""
    w = w.clone()
    for i in torch.nonzero(~good.all(-1)).flatten().tolist():
        kept = w[i][:, good[i]]
        cand = torch.diag(valid[i].to(w.dtype))
        cand = cand - kept @ (kept.mT @ cand)
        basis = torch.linalg.svd(cand)[0]
        w[i][:, ~good[i]] = basis[:, : int((~good[i]).sum())]
    return w


def tangent_svd(u: Tensor, v: Tensor, a: Tensor, bmat: Tensor, reduce_m: Reduce = None,
                reduce_n: Reduce = None, rank: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of M = A Vᵀ + U Bᵀ (U, V orthonormal; A m×r, B n×r), rank ≤ 2r.

    [A U] = [Qa U]·[[Ra, 0], [Ca, I]] and [V B] = [V Qb]·[[I, Cb], [0, Rb]] reduce M to a 2r×2r
    core [[Ra, 0], [Ca + Cbᵀ, Rbᵀ]] whose SVD W Σ Zᵀ gives M = ([Qa U] W) Σ ([V Qb] Z)ᵀ.
    Returns left (b,m,k), sigma (b,k) descending in fp64, right (b,n,k) with k = 2r, or k = r when
    ``rank`` = r is asked (then null directions are completed so left/right stay orthonormal).
    """
    r = u.shape[-1]
    qa, ra, ca, keep_a = _orthonormalize(a, u, reduce_m)
    qb, rb, cb, keep_b = _orthonormalize(bmat, v, reduce_n)
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
            w = _complete(w, torch.cat([keep_a, ones], -1), good)
            z = _complete(z, torch.cat([ones, keep_b], -1), good)
            sigma = sigma * good
    left = _mm(torch.cat([qa, u], dim=-1), w)
    right = _mm(torch.cat([v, qb], dim=-1), z)
    return left, sigma, right


def _ns_polar(core: Tensor, steps: int) -> Tensor:
    """Approximate polar factor of small cores by Muon's quintic Newton–Schulz iteration (fp64)."""
    a, b, c = NS_COEFFS
    x = core / core.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x


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
        qa, ra, ca, _ = _orthonormalize(xi.dU, x.U, reduce_m)
        qb, rb, cb, _ = _orthonormalize(xi.dK, x.V, reduce_n)
        core = torch.zeros(x.U.shape[0], 2 * r, 2 * r, dtype=torch.float64, device=x.U.device)
        core[:, :r, :r], core[:, r:, :r], core[:, r:, r:] = ra, ca + cb.mT, rb.mT
        polar = _ns_polar(core, ns_steps)
        return _mm(torch.cat([qa, x.U], dim=-1), polar), torch.cat([x.V, qb], dim=-1)
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
