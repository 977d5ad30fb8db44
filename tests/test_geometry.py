"""Fixed-rank geometry (docs/design.md §1) against the dense float64 oracle, over seeds and shapes.

Tolerances: every factored operation is a handful of fp64 matmuls, QRs and a 2r×2r SVD, so it
agrees with the dense oracle to ~1e-15 relative; 1e-10 leaves room for conditioning (random
points have σ_min/σ_max ~ 1e-2, entering the truncated SVD's gap) without hiding a wrong formula,
which shows up at O(1).
"""

from __future__ import annotations

import pytest
import torch

from riemann_zero.manifold import fixed_rank as geo
from riemann_zero.manifold import reference as ref

F64 = torch.float64
TOL = 1e-10
SEEDS = [0, 1, 2]
# (m, n, r): tall, wide, r = 1, square r = min(m, n), tall with r = n, wide with r = m.
SHAPES = [(20, 12, 3), (9, 30, 2), (15, 10, 1), (7, 7, 7), (12, 5, 5), (6, 14, 6)]
B = 3  # adapters per batched call
CASES = [(s, shape) for s in SEEDS for shape in SHAPES]
IDS = [f"seed{s}-{m}x{n}r{r}" for s, (m, n, r) in CASES]
# Muon's quintic Newton–Schulz coefficients (a, b, c), written out from their source rather than
# read from the implementation: K. Jordan et al., "Muon: An optimizer for hidden layers in neural
# networks" (2024), zeropower_via_newtonschulz5 in github.com/KellerJordan/Muon; the same values
# as torch.optim.Muon's default ns_coefficients.
MUON_NS = (3.4445, -4.7750, 2.0315)


def rand_point(gen: torch.Generator, b: int, m: int, n: int, r: int) -> geo.Point:
    u = torch.linalg.qr(torch.randn(b, m, r, generator=gen, dtype=F64))[0]
    k = torch.randn(b, n, r, generator=gen, dtype=F64)
    return geo.Point(u, torch.linalg.qr(k)[0], k)


def rand_tangent(gen: torch.Generator, x: geo.Point) -> geo.Tangent:
    g = torch.randn(x.U.shape[0], x.U.shape[1], x.V.shape[1], generator=gen, dtype=F64)
    return geo.rgrad(x, g @ x.V, g.mT @ x.U)


def dense(x: geo.Point, xi: geo.Tangent) -> torch.Tensor:
    """The m×n matrices dU Vᵀ + U dKᵀ of a batch of tangent vectors."""
    return xi.dU @ x.V.mT + x.U @ xi.dK.mT


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def orth_err(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return float((q.mT @ q - eye).norm(dim=(-2, -1)).max())


def one(t, i: int):
    """Adapter i of a batched Point/Tangent, keeping a batch dimension of 1."""
    return type(t)(*(f[i : i + 1] for f in t))


@pytest.mark.parametrize(("seed", "shape"), CASES, ids=IDS)
def test_project_is_dense_projection_idempotent_and_gauged(seed, shape):
    m, n, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = rand_point(gen, B, m, n, r)
    p = torch.randn(B, m, 4, generator=gen, dtype=F64)
    q = torch.randn(B, n, 4, generator=gen, dtype=F64)
    xi = geo.project(x, p, q)
    g = torch.randn(B, m, n, generator=gen, dtype=F64)
    eta = geo.rgrad(x, g @ x.V, g.mT @ x.U)
    for i in range(B):
        assert rel(dense(x, xi)[i], ref.project(x.U[i], x.V[i], p[i] @ q[i].mT)) < TOL
        assert rel(dense(x, eta)[i], ref.project(x.U[i], x.V[i], g[i])) < TOL
    for t in (xi, eta):
        size = float(t.dU.norm() + t.dK.norm())  # dU = 0 when r = m: compare with the whole ξ
        # gauge Uᵀ dU = 0
        assert float((x.U.mT @ t.dU).norm()) < TOL * size
        # idempotent, and in factors: the gauge makes (dU, dK) unique, so P_T(ξ) has the same ones
        again = geo.project(x, torch.cat([t.dU, x.U], -1), torch.cat([x.V, t.dK], -1))
        assert float((again.dU - t.dU).norm() + (again.dK - t.dK).norm()) < TOL * size
    # the point itself is a tangent vector (dU = 0, dK = K)
    self_t = geo.project(x, x.U, x.K)
    assert float(self_t.dU.norm()) < TOL * float(x.K.norm()) and rel(self_t.dK, x.K) < TOL


@pytest.mark.parametrize(("seed", "shape"), CASES, ids=IDS)
def test_inner_is_frobenius(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    x = rand_point(gen, B, *shape)
    a, b = rand_tangent(gen, x), rand_tangent(gen, x)
    want = (dense(x, a) * dense(x, b)).sum((-2, -1))
    assert rel(geo.inner(a, b), want) < TOL


@pytest.mark.parametrize(("seed", "shape"), CASES, ids=IDS)
def test_ortho_svd_is_dense_polar(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    x = rand_point(gen, B, *shape)
    xi = rand_tangent(gen, x)
    p, q = geo.ortho(x, xi)
    for i in range(B):
        assert rel(p[i] @ q[i].mT, ref.polar(dense(x, xi)[i])) < TOL


@pytest.mark.parametrize(("seed", "shape"), CASES, ids=IDS)
def test_ortho_newton_schulz_is_odd_polynomial_of_singular_values(seed, shape):
    """NS does not give the polar factor; what it gives exactly is Σ p(σᵢ/‖ξ‖_F) uᵢ vᵢᵀ: the same
    singular vectors as ξ, singular values mapped by Muon's scalar quintic iteration p, which puts
    every σᵢ ≥ 3e-3·‖ξ‖_F into the band [0.68, 1.21] after 5 steps (computed from MUON_NS)."""
    gen = torch.Generator().manual_seed(seed)
    x = rand_point(gen, B, *shape)
    xi = rand_tangent(gen, x)
    p, q = geo.ortho(x, xi, method="newton_schulz", ns_steps=5)
    a, b, c = MUON_NS
    for i in range(B):
        z = dense(x, xi)[i]
        u, s, vt = torch.linalg.svd(z, full_matrices=False)
        y = s / z.norm()
        for _ in range(5):
            y = a * y + b * y**3 + c * y**5
        got = p[i] @ q[i].mT
        assert rel(got, u @ torch.diag(y) @ vt) < TOL
        sv = torch.linalg.svdvals(got)
        big = s >= 3e-3 * z.norm()
        assert big.any()
        band = sv[: int(big.sum())]
        assert float(band.max()) <= 1.21 and float(band.min()) >= 0.68
    with pytest.raises(ValueError, match="but got"):
        geo.ortho(x, xi, method="qr")


@pytest.mark.parametrize(("seed", "shape"), CASES, ids=IDS)
def test_retract_is_dense_truncated_svd(seed, shape):
    m, n, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = rand_point(gen, B, m, n, r)
    xi = geo.scale(rand_tangent(gen, x), 0.3)
    decay = torch.tensor([0.9, 1.0, 0.5], dtype=F64)
    y = geo.retract(x, xi, decay)
    assert orth_err(y.U) < TOL and orth_err(y.V) < TOL
    for i in range(B):
        want = ref.truncate(decay[i] * x.U[i] @ x.K[i].mT + dense(x, xi)[i], r)
        assert rel(y.U[i] @ y.K[i].mT, want) < TOL
        # K = V Σ: V spans range K with VᵀK diagonal, non-negative, descending
        vk = y.V[i].mT @ y.K[i]
        sig = torch.diagonal(vk)
        assert float((vk - torch.diag(sig)).norm()) < TOL * float(sig.norm())
        assert bool((sig >= 0).all()) and bool((sig[:-1] >= sig[1:]).all())


@pytest.mark.parametrize(("seed", "shape"), CASES, ids=IDS)
def test_transport_is_dense_projection_at_new_point(seed, shape):
    m, n, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = rand_point(gen, B, m, n, r)
    xi = rand_tangent(gen, x)
    y = geo.retract(x, geo.scale(rand_tangent(gen, x), 0.2))
    t = geo.transport(x, xi, y)
    for i in range(B):
        assert rel(dense(y, t)[i], ref.project(y.U[i], y.V[i], dense(x, xi)[i])) < TOL
    assert float((y.U.mT @ t.dU).norm()) < TOL * float(t.dU.norm().clamp_min(1.0))


@pytest.mark.parametrize(("seed", "shape"), CASES[:: len(SHAPES) + 1], ids=IDS[:: len(SHAPES) + 1])
def test_batched_equals_looped(seed, shape):
    """One call on b adapters gives what b calls on one adapter give (dense values compared for
    ortho/retract, whose factors are unique only up to signs of singular vectors)."""
    gen = torch.Generator().manual_seed(seed)
    x = rand_point(gen, B, *shape)
    xi, eta = rand_tangent(gen, x), geo.scale(rand_tangent(gen, x), 0.1)
    g = torch.randn(B, shape[0], shape[1], generator=gen, dtype=F64)
    decay = torch.tensor([0.9, 0.8, 0.7], dtype=F64)
    grad = geo.rgrad(x, g @ x.V, g.mT @ x.U)
    pol = geo.ortho(x, xi)
    ns = geo.ortho(x, xi, method="newton_schulz")
    y = geo.retract(x, eta, decay)
    t = geo.transport(x, xi, y)
    for i in range(B):
        xi_i, x_i = one(xi, i), one(x, i)
        g_i = geo.rgrad(x_i, (g @ x.V)[i : i + 1], (g.mT @ x.U)[i : i + 1])
        assert rel(dense(x_i, g_i)[0], dense(x, grad)[i]) < 1e-13
        for got, method in ((pol, "svd"), (ns, "newton_schulz")):
            p_i, q_i = geo.ortho(x_i, xi_i, method=method)
            assert rel(p_i[0] @ q_i[0].mT, got[0][i] @ got[1][i].mT) < 1e-12
        y_i = geo.retract(x_i, one(eta, i), decay[i : i + 1])
        assert rel(y_i.U[0] @ y_i.K[0].mT, y.U[i] @ y.K[i].mT) < 1e-12
        t_i = geo.transport(x_i, xi_i, y_i)
        assert rel(dense(y_i, t_i)[0], dense(y, t)[i]) < 1e-12


# ---------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}r{r}" for m, n, r in SHAPES])
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_zero_tangent_gives_zero_polar_no_nan(shape, method):
    gen = torch.Generator().manual_seed(0)
    x = rand_point(gen, B, *shape)
    zero = geo.Tangent(torch.zeros_like(x.U), torch.zeros_like(x.K))
    p, q = geo.ortho(x, zero, method=method)
    assert bool(torch.isfinite(p).all() and torch.isfinite(q).all())
    assert float((p @ q.mT).abs().max()) == 0.0
    assert float(geo.project(x, p, q).dU.abs().max()) == 0.0


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}r{r}" for m, n, r in SHAPES])
def test_rank_one_tangent_polar_is_exact_no_noise(shape):
    """dU = 0 and dK of rank 1: ξ = U dKᵀ has rank 1; its polar is u₁v₁ᵀ, the zero directions of
    the 2r×2r core must not leak in (eps drops them)."""
    m, n, r = shape
    gen = torch.Generator().manual_seed(1)
    x = rand_point(gen, B, m, n, r)
    dk = torch.randn(B, n, 1, generator=gen, dtype=F64)
    dk = dk @ torch.randn(B, 1, r, generator=gen, dtype=F64)
    xi = geo.Tangent(torch.zeros_like(x.U), dk)
    for method in ("svd", "newton_schulz"):
        p, q = geo.ortho(x, xi, method=method)
        assert bool(torch.isfinite(p).all() and torch.isfinite(q).all())
        for i in range(B):
            got = p[i] @ q[i].mT
            want = ref.polar(dense(x, xi)[i])
            if method == "svd":
                assert rel(got, want) < TOL
            else:  # same rank-1 direction, singular value in the NS band (σ/‖ξ‖_F = 1 here)
                assert rel(got / got.norm(), want) < TOL
                assert 0.68 <= float(got.norm()) <= 1.21


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}r{r}" for m, n, r in SHAPES])
def test_rank_deficient_retraction_keeps_orthonormal_factors(shape):
    """decay·X + ξ of rank < r (X = 0; X with a zero column in K; ξ = −X): the new U, V stay
    orthonormal, the point equals the dense truncation, K has zero columns, no NaN."""
    m, n, r = shape
    gen = torch.Generator().manual_seed(2)
    x = rand_point(gen, B, m, n, r)
    zero = geo.Tangent(torch.zeros_like(x.U), torch.zeros_like(x.K))
    k_def = x.K.clone()
    k_def[..., -1] = 0.0  # X of rank r − 1 (V still a full orthonormal basis)
    cases = [
        (geo.Point(x.U, x.V, torch.zeros_like(x.K)), zero, 0),  # X = 0, nothing moves
        (geo.Point(x.U, x.V, k_def), zero, r - 1),
        (x, geo.Tangent(torch.zeros_like(x.U), -x.K), 0),  # ξ = −X cancels the point
    ]
    for point, step, rank in cases:
        y = geo.retract(point, step)
        assert bool(torch.isfinite(y.U).all() and torch.isfinite(y.K).all())
        assert orth_err(y.U) < TOL and orth_err(y.V) < TOL
        for i in range(B):
            want = ref.truncate(point.U[i] @ point.K[i].mT + dense(point, step)[i], r)
            got = y.U[i] @ y.K[i].mT
            assert float((got - want).norm()) < TOL * max(1.0, float(want.norm()))
        if rank < r:
            assert float(y.K[..., rank:].abs().max()) < TOL


def test_zero_projection_and_transport_of_zero():
    gen = torch.Generator().manual_seed(3)
    x = rand_point(gen, 2, 10, 8, 3)
    y = geo.retract(x, geo.scale(rand_tangent(gen, x), 0.1))
    z = geo.project(x, torch.zeros(2, 10, 4, dtype=F64), torch.zeros(2, 8, 4, dtype=F64))
    assert float(z.dU.abs().max()) == 0.0 and float(z.dK.abs().max()) == 0.0
    t = geo.transport(x, z, y)
    assert float(t.dU.abs().max()) == 0.0 and float(t.dK.abs().max()) == 0.0


@pytest.mark.parametrize("shape", [(20, 12, 3), (9, 30, 2)])
def test_float32_inputs_stay_close_to_fp64(shape):
    """fp32 factors (the bf16-model path): tall products in fp32, small cores in fp64, so the
    result is within fp32 rounding (~1e-6 relative) of the fp64 one."""
    gen = torch.Generator().manual_seed(4)
    x = rand_point(gen, 2, *shape)
    xi = rand_tangent(gen, x)
    x32 = geo.Point(*(t.float() for t in x))
    xi32 = geo.Tangent(*(t.float() for t in xi))
    y, y32 = geo.retract(x, geo.scale(xi, 0.1)), geo.retract(x32, geo.scale(xi32, 0.1))
    assert y32.U.dtype == torch.float32
    assert rel((y32.U @ y32.K.mT).double(), y.U @ y.K.mT) < 1e-5
    assert orth_err(y32.U.double()) < 1e-5
    p, q = geo.ortho(x32, xi32)
    p64, q64 = geo.ortho(x, xi)
    assert rel((p @ q.mT).double(), p64 @ q64.mT) < 1e-5
