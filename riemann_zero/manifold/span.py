"""One manifold step in 2r×2r coordinates: factor once, then only small algebra.

At a point X = U Kᵀ (V spanning range K) with a tangent-like vector M = M_U Vᵀ + U M_Kᵀ, write
M_U = Q_a R_a + U C_a (Q_a ⊥ U) and M_K = V C_b + Q_b R_b (Q_b ⊥ V). Then X, M, polar(M), its
tangent projection, the retraction input (1 − ηλ)X − ηD, its best rank-r approximation, and the
transport of M to the new point all live in span L = [Q_a U] (m×2r) on the left and
R = [V Q_b] (n×2r) on the right, so each is a 2r×2r coordinate matrix C standing for L C Rᵀ:

- M ↦ [[R_a, 0], [C_bᵀ, R_bᵀ]]   (C_a, the U-part of M_U, is dropped: that is the projection
  (I − UUᵀ), so M_U may be a raw Euclidean block such as G V)
- X ↦ [[0, 0], [Sᵀ, 0]] with S = VᵀK
- polar(L C Rᵀ) = L polar(C) Rᵀ (L, R orthonormal): the polar factor of the coordinates,
  :func:`riemann_zero.linalg.polar_factor`
- tangent projection: zero the (Q_a, Q_b) block
- the new point U' = L W₁, V' = R Z₁ from the SVD of the coordinates, K' = V' Σ₁
- transport of C to the new point: dU = L (I − W₁W₁ᵀ) C Z₁, dK = R Cᵀ W₁

Collectives: the two CholeskyQR2-style orthonormalisations (four reductions of r×r / 2r×r blocks)
plus S = VᵀK. Tall work: the Gram products, the basis updates and one (rows × 2r × 2r) matmul per
side. Compared with calling project/ortho/retract/transport one after another this avoids every
re-orthonormalisation they would repeat. :mod:`riemann_zero.manifold.fixed_rank` keeps those
primitives as the specification.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from riemann_zero import linalg
from riemann_zero.linalg import Reduce, complete, gram, mm, orthonormalize
from riemann_zero.manifold.fixed_rank import NULL_RTOL, Point, Tangent

# ‖UᵀU − I‖_F above which U (and V) are re-orthonormalised: a few times the fresh error of one
# fp32 step (~1e-6), well below the 1e-5 the health checks allow.
DRIFT_TOL = 3e-6

__all__ = ["Span", "restore_orthonormality", "factor", "tangent_part", "truncate", "transport",
           "split_blocks"]


class Span(NamedTuple):
    """Orthonormal bases L = [Q_a U] and R = [V Q_b] (kept as blocks: no tall copies), with the
    masks of their non-zero columns."""

    qa: Tensor  # (b, m, r)
    u: Tensor  # (b, m, r)
    v: Tensor  # (b, n, r)
    qb: Tensor  # (b, n, r)
    valid_left: Tensor  # (b, 2r) bool
    valid_right: Tensor  # (b, 2r) bool

    def left(self, small: Tensor) -> Tensor:
        """L @ small for small (b, 2r, k)."""
        r = self.u.shape[-1]
        small = small.to(self.u.dtype)
        return torch.baddbmm(mm(self.qa, small[:, :r]), self.u, small[:, r:])

    def right(self, small: Tensor) -> Tensor:
        """R @ small for small (b, 2r, k)."""
        r = self.v.shape[-1]
        small = small.to(self.v.dtype)
        return torch.baddbmm(mm(self.v, small[:, :r]), self.qb, small[:, r:])


def restore_orthonormality(x: Point, reduce_m: Reduce = None, reduce_n: Reduce = None,
                           tol: float = DRIFT_TOL) -> Point:
    """Undo the slow drift of UᵀU and VᵀV away from I, keeping X = U Kᵀ exactly.

    Each step builds U' = [Q_a U] W₁ from the previous U, so rounding errors of U carry over and
    random-walk (measured ~1e-7·√steps in fp32). When ‖UᵀU − I‖ or ‖VᵀV − I‖ exceeds ``tol``:
    U ← U G_U^{-1/2}, K ← K G_U^{1/2}, V ← V G_V^{-1/2} (range V, hence K ∈ span V, unchanged).
    Costs two r×r Gram reductions per step; the correction itself runs rarely.
    """
    g_u, g_v = gram(x.U, x.U, reduce_m), gram(x.V, x.V, reduce_n)
    eye = torch.eye(g_u.shape[-1], dtype=g_u.dtype, device=g_u.device)
    drift = torch.maximum((g_u - eye).norm(dim=(-2, -1)), (g_v - eye).norm(dim=(-2, -1)))
    if not bool((drift > tol).any()):
        return x

    u_inv, u_half = linalg.sym_powers(g_u, 1e-12)
    v_inv, _ = linalg.sym_powers(g_v, 1e-12)
    return Point(mm(x.U, u_inv), mm(x.V, v_inv), mm(x.K, u_half))


def factor(x: Point, m_u: Tensor, m_k: Tensor, reduce_m: Reduce = None,
           reduce_n: Reduce = None) -> tuple[Span, Tensor, Tensor]:
    """Bases of the step's span and the coordinates of M = (I − UUᵀ) m_u Vᵀ + U m_kᵀ and of X.

    ``x`` must have orthonormal U and V (see :func:`restore_orthonormality`). Returns (span,
    coords of M, coords of X), coordinates (b, 2r, 2r) in fp64.
    """
    r = x.U.shape[-1]
    qa, ra, _, keep_a = orthonormalize(m_u, x.U, reduce_m)
    qb, rb, cb, keep_b = orthonormalize(m_k, x.V, reduce_n)
    s = gram(x.V, x.K, reduce_n)
    cm = torch.zeros(x.U.shape[0], 2 * r, 2 * r, dtype=torch.float64, device=x.U.device)
    cm[:, :r, :r] = ra
    cm[:, r:, :r] = cb.mT
    cm[:, r:, r:] = rb.mT
    cx = torch.zeros_like(cm)
    cx[:, r:, :r] = s.mT
    ones = torch.ones_like(keep_a)
    span = Span(qa, x.U, x.V, qb, torch.cat([keep_a, ones], -1), torch.cat([ones, keep_b], -1))
    return span, cm, cx


def tangent_part(c: Tensor) -> Tensor:
    """Coordinates of the projection onto the tangent space at X: the (Q_a, Q_b) block is 0."""
    r = c.shape[-1] // 2
    out = c.clone()
    out[:, :r, r:] = 0
    return out


def split_blocks(c: Tensor, scale_u: Tensor, scale_k: Tensor) -> Tensor:
    """Scale the U̇ block (rows Q_a) and the K̇ block (rows U) of tangent coordinates separately."""
    r = c.shape[-1] // 2
    out = c.clone()
    out[:, :r] *= scale_u.view(-1, 1, 1)
    out[:, r:] *= scale_k.view(-1, 1, 1)
    return out


def truncate(span: Span, c: Tensor, r: int) -> tuple[Point, Tensor, Tensor]:
    """Best rank-r approximation of L C Rᵀ: the new point, and W₁, Z₁ (2r×r) for transport."""
    w, sigma, zt = torch.linalg.svd(c)
    w1, z1, s1 = w[..., :r], zt.mT[..., :r], sigma[:, :r]
    good = s1 > NULL_RTOL * s1[:, :1]
    if not bool(good.all()):  # rank < r: complete the bases inside the valid coordinates
        w1 = complete(w1, span.valid_left, good)
        z1 = complete(z1, span.valid_right, good)
        s1 = s1 * good
    v_new = span.right(z1)
    return Point(span.left(w1), v_new, v_new * s1.to(v_new.dtype).unsqueeze(-2)), w1, z1


def transport(span: Span, c: Tensor, w1: Tensor, z1: Tensor) -> Tangent:
    """Project L C Rᵀ onto the tangent space at the point (L W₁, R Z₁)."""
    eye = torch.eye(w1.shape[-2], dtype=w1.dtype, device=w1.device)
    du = (eye - w1 @ w1.mT) @ c @ z1
    dk = c.mT @ w1
    return Tangent(span.left(du), span.right(dk))
