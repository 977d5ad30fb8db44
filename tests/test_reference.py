"""The dense oracle itself (riemann_zero.manifold.reference) against first-principles definitions,
so that the geometry and optimizer tests that trust it rest on something checked.

Tolerance 1e-10: each check is a few fp64 SVDs/matmuls of ≤ 12×12 matrices (errors ~1e-15).
"""

from __future__ import annotations

import pytest
import torch

from riemann_zero.manifold import reference as ref

F64 = torch.float64
TOL = 1e-10
SHAPES = [(6, 4, 2), (3, 7, 1), (5, 5, 5)]


def point(seed: int, m: int, n: int, r: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, r, generator=gen, dtype=F64) @ torch.randn(r, n, generator=gen, dtype=F64)
    u, v = ref.row_col_bases(x, r)
    return gen, x, u, v


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_project_is_the_orthogonal_projector_onto_the_tangent_space(seed, shape):
    """As a linear map on R^{m×n}: symmetric, idempotent, fixes X, trace = dim T = (m + n − r) r."""
    m, n, r = shape
    gen, x, u, v = point(seed, m, n, r)
    basis = torch.eye(m * n, dtype=F64).reshape(m * n, m, n)
    mat = torch.stack([ref.project(u, v, e).reshape(-1) for e in basis], dim=1)
    assert float((mat - mat.mT).norm()) < TOL
    assert float((mat @ mat - mat).norm()) < TOL
    assert abs(float(torch.trace(mat)) - (m + n - r) * r) < TOL
    assert float((ref.project(u, v, x) - x).norm()) < TOL * float(x.norm())
    # the normal space: (I − UUᵀ) Z (I − VVᵀ) projects to 0
    z = torch.randn(m, n, generator=gen, dtype=F64)
    normal = (torch.eye(m, dtype=F64) - u @ u.mT) @ z @ (torch.eye(n, dtype=F64) - v @ v.mT)
    assert float(ref.project(u, v, normal).norm()) < TOL
    assert float((u @ u.mT @ x - x).norm() + (x @ v @ v.mT - x).norm()) < TOL * float(x.norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polar_is_the_nuclear_norm_maximiser(seed):
    """polar(Z) has unit singular values on range Z, ⟨Z, polar Z⟩ = ‖Z‖_*, scale-free, polar(0)=0,
    and directions below eps·σ_max are dropped."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(7, 3, generator=gen, dtype=F64) @ torch.randn(3, 5, generator=gen, dtype=F64)
    p = ref.polar(z)
    sv = torch.linalg.svdvals(p)
    assert float((sv[:3] - 1).abs().max()) < TOL and float(sv[3:].abs().max()) < TOL
    assert abs(float((z * p).sum()) - float(torch.linalg.matrix_norm(z, "nuc"))) < TOL * 10
    assert float((ref.polar(1e3 * z) - p).norm()) < TOL
    assert float(ref.polar(torch.zeros(4, 3, dtype=F64)).abs().max()) == 0.0
    u, s, vt = torch.linalg.svd(z, full_matrices=False)
    tiny = u @ torch.diag(torch.tensor([1.0, 1e-9, 0, 0, 0], dtype=F64)) @ vt
    assert float((ref.polar(tiny) - u[:, :1] @ vt[:1]).norm()) < TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_truncate_is_eckart_young(seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(8, 6, generator=gen, dtype=F64)
    s = torch.linalg.svdvals(z)
    for r in (1, 3, 6):
        t = ref.truncate(z, r)
        assert int(torch.linalg.matrix_rank(t)) == r
        assert abs(float((z - t).norm() ** 2) - float((s[r:] ** 2).sum())) < TOL
        for _ in range(5):  # no random rank-r matrix does better
            other = torch.randn(8, r, generator=gen, dtype=F64) @ torch.randn(r, 6, generator=gen,
                                                                              dtype=F64)
            assert float((z - other).norm()) > float((z - t).norm())
    assert ref.best_rank(z, 2).equal(ref.truncate(z, 2))


@pytest.mark.parametrize("buffer", ["raw", "paper"])
def test_riemannion_step_basic_properties(buffer):
    """Zero gradient: pure decay (1 − ηλ)X; the result is rank r with consistent bases; the
    direction D = P_T(polar ξ) satisfies ⟨D, ξ⟩ = ‖ξ‖_* (ξ is tangent, P_T self-adjoint) and
    ‖D‖_F ≤ ‖polar ξ‖_F = √rank ξ (P_T is an orthogonal projector; NOT a spectral contraction)."""
    m, n, r = 6, 5, 2
    gen, x, u, v = point(3, m, n, r)
    lr, wd = 0.1, 0.5
    x0, u0, v0, m0 = ref.riemannion_step(u, v, x, torch.zeros(m, n, dtype=F64), None, lr=lr,
                                         beta=0.9, weight_decay=wd, buffer=buffer)
    assert float((x0 - (1 - lr * wd) * x).norm()) < TOL and float(m0.abs().max()) == 0.0
    g = torch.randn(m, n, generator=gen, dtype=F64)
    x1, u1, v1, m1 = ref.riemannion_step(u, v, x, g, None, lr=lr, beta=0.9, weight_decay=0.0,
                                         buffer=buffer)
    assert int(torch.linalg.matrix_rank(x1)) == r
    assert float((u1 @ u1.mT @ x1 @ v1 @ v1.mT - x1).norm()) < TOL
    grad = ref.project(u, v, g)
    d = ref.project(u, v, ref.polar(grad))
    assert abs(float((d * grad).sum()) - float(torch.linalg.matrix_norm(grad, "nuc"))) < TOL * 10
    assert float(d.norm()) <= float(torch.linalg.matrix_rank(grad)) ** 0.5 + TOL
    # The step itself, rebuilt from the definitions with torch alone (not the reference's own
    # project/polar/truncate): P_T(Z) = UUᵀZ + ZVVᵀ − UUᵀZVVᵀ, polar from an SVD keeping the
    # σ > 1e-6·σ_max directions, and the new point the best rank-r approximation of X − ηD
    # (Eckart–Young: the residual is the tail of the singular values).
    pu, pv = u @ u.mT, v @ v.mT

    def tangent(z):
        return pu @ z + z @ pv - pu @ z @ pv

    g_t = tangent(g)
    us, ss, vts = torch.linalg.svd(g_t, full_matrices=False)
    keep = ss > 1e-6 * ss[0]
    d_fp = tangent(us[:, keep] @ vts[keep])
    y = x - lr * d_fp
    sy = torch.linalg.svdvals(y)
    assert abs(float((y - x1).norm() ** 2) - float((sy[r:] ** 2).sum())) < TOL
    assert abs(float((x1 * (y - x1)).sum())) < TOL  # the residual is orthogonal to the point
    assert float((m1 - (g_t if buffer == "raw" else d_fp)).norm()) < TOL
