"""Dense float64 reference of the fixed-rank geometry and of one Riemannion step.

Obviously correct and slow: it materialises X, G and every tangent vector as m×n matrices. It is
the oracle of the tests and the readable specification of :mod:`riemann_zero.manifold.fixed_rank`,
:mod:`riemann_zero.manifold.span` and :class:`riemann_zero.Riemannion`. It imports nothing of the
package.

It also holds the dense oracle of Tensorion's LMO (:mod:`riemann_zero.manifold.tensor`): every
bipartition of the modes enumerated by brute force, nuclear norms by full SVD.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = [
    "row_col_bases",
    "project",
    "polar",
    "truncate",
    "riemannion_step",
    "best_rank",
    "tensor_unfold",
    "tensor_lmo",
    "weighted_sum",
    "cayley",
    "cayley_inverse",
    "sqrtm",
    "expm",
    "logm",
    "geodesic",
    "rotation_angles",
]


def row_col_bases(x: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Orthonormal bases (m×r, n×r) of the column and row spaces of a rank-r matrix."""
    u, _, vt = torch.linalg.svd(x.double(), full_matrices=False)
    return u[:, :r], vt[:r].mT


def project(u: Tensor, v: Tensor, z: Tensor) -> Tensor:
    """P_T(Z) = UUᵀZ + ZVVᵀ − UUᵀZVVᵀ at the point with column basis U and row basis V."""
    pu, pv = u @ u.mT, v @ v.mT
    return pu @ z + z @ pv - pu @ z @ pv


def polar(z: Tensor, eps: float = 1e-6) -> Tensor:
    """Polar factor Σ_{σᵢ > eps·σ_max} uᵢ vᵢᵀ (zero for Z = 0)."""
    u, s, vt = torch.linalg.svd(z, full_matrices=False)
    keep = (s > eps * s[0]) if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return u[:, keep] @ vt[keep]


def truncate(z: Tensor, r: int) -> Tensor:
    """Best rank-r approximation (truncated SVD)."""
    u, s, vt = torch.linalg.svd(z, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vt[:r]


def best_rank(z: Tensor, k: int) -> Tensor:
    """Alias of :func:`truncate` used where the intent is 'best rank-k approximation of G'."""
    return truncate(z, k)


def riemannion_step(u: Tensor, v: Tensor, x: Tensor, g: Tensor, momentum: Tensor | None, *,
                    lr: float, beta: float, weight_decay: float, eps: float = 1e-6,
                    buffer: str = "raw") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One dense Riemannion step.

    Args:
        u, v: column and row bases of the current point x (m×r, n×r).
        x: current point (m×n, rank r); g: Euclidean gradient at x (m×n).
        momentum: previous momentum, a tangent matrix at the PREVIOUS point (or None).
    Returns:
        (x_new, u_new, v_new, momentum_new) with momentum_new stored at x (transported next step).
    """
    r = u.shape[1]
    grad = project(u, v, g)
    m = grad if momentum is None else beta * project(u, v, momentum) + grad
    d = project(u, v, polar(m, eps))
    x_new = truncate((1 - lr * weight_decay) * x - lr * d, r)
    u_new, v_new = row_col_bases(x_new, r)
    return x_new, u_new, v_new, (m if buffer == "raw" else d)


def tensor_unfold(m: Tensor, rows: tuple[int, ...]) -> Tensor:
    """The matrix whose rows index the modes ``rows`` (in that order) and whose columns index the
    other modes (in increasing order), of one tensor m."""
    cols = tuple(i for i in range(m.ndim) if i not in rows)
    r = 1
    for i in rows:
        r *= m.shape[i]
    return m.permute(*rows, *cols).reshape(r, -1)


def tensor_lmo(m: Tensor) -> tuple[Tensor, tuple[int, ...], float]:
    """Exact LMO of the tensor norm whose dual is max over bipartitions of the nuclear norm.

    Brute force over every non-empty proper subset of the modes (both τ and its complement),
    float64. Returns (D, τ*, ‖M_(τ*)‖_*) with D = fold(polar(M_(τ*))); among equal norms the
    first subset in ``itertools.combinations`` order wins.
    """
    m = m.double()
    best = None
    for size in range(1, m.ndim):
        for rows in itertools.combinations(range(m.ndim), size):
            value = float(torch.linalg.svdvals(tensor_unfold(m, rows)).sum())
            if best is None or value > best[1] * (1 + 1e-12):
                best = (rows, value)
    rows, value = best
    mat = tensor_unfold(m, rows)
    d = polar(mat)
    cols = tuple(i for i in range(m.ndim) if i not in rows)
    perm = rows + cols
    d = d.reshape(*[m.shape[i] for i in perm])
    inverse = [perm.index(i) for i in range(m.ndim)]
    return d.permute(*inverse).contiguous(), rows, value


# ------------------------------------------------------------------ merging (docs/design.md §9)
def weighted_sum(terms: list[tuple[float, Tensor, Tensor]]) -> Tensor:
    """Σ cᵢ Bᵢ Aᵢ as a dense m×n matrix, for (cᵢ = weight·scaling, Bᵢ, Aᵢ)."""
    return sum(c * (b.double() @ a.double()) for c, b, a in terms)


def cayley(s: Tensor) -> Tensor:
    """(I − S)(I + S)⁻¹ with an explicit inverse."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype)
    return (eye - s) @ torch.linalg.inv(eye + s)


def cayley_inverse(r: Tensor) -> Tensor:
    """(I + R)⁻¹(I − R) with an explicit inverse."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    return torch.linalg.inv(eye + r) @ (eye - r)


def sqrtm(a: Tensor, iters: int = 60) -> Tensor:
    """Principal square root by the Denman–Beavers iteration (Y → A^{1/2}, Z → A^{-1/2})."""
    y, z = a.clone(), torch.eye(a.shape[-1], dtype=a.dtype)
    for _ in range(iters):
        y, z = 0.5 * (y + torch.linalg.inv(z)), 0.5 * (z + torch.linalg.inv(y))
    return y


def expm(a: Tensor, terms: int = 30, squarings: int = 10) -> Tensor:
    """exp(A) by scaling and squaring with a Taylor series."""
    x = a / 2**squarings
    out, term = torch.eye(a.shape[-1], dtype=a.dtype), torch.eye(a.shape[-1], dtype=a.dtype)
    for j in range(1, terms):
        term = term @ x / j
        out = out + term
    for _ in range(squarings):
        out = out @ out
    return out


def logm(a: Tensor, roots: int = 12, terms: int = 40) -> Tensor:
    """log(A) by inverse scaling and squaring: 2ᵏ log(A^{1/2ᵏ}) with the series of log(I + X)."""
    for _ in range(roots):
        a = sqrtm(a)
    x = a - torch.eye(a.shape[-1], dtype=a.dtype)
    out, power = torch.zeros_like(x), torch.eye(a.shape[-1], dtype=a.dtype)
    for j in range(1, terms):
        power = power @ x
        out = out + (-1) ** (j + 1) * power / j
    return out * 2**roots


def geodesic(r1: Tensor, r2: Tensor, t: float) -> Tensor:
    """R₁ exp(t log(R₁ᵀ R₂)) with the dense series above."""
    return r1 @ expm(t * logm(r1.mT @ r2))


def rotation_angles(r: Tensor) -> Tensor:
    """Angles θ ∈ (−π, π] of a rotation from its complex eigenvalues, sorted ascending."""
    lam = torch.linalg.eigvals(r)
    return torch.sort(torch.angle(lam)).values
