"""The fused step the optimizer runs (manifold/span.py: factor → polar → tangent part → truncate →
transport, in 2r×2r coordinates) against the dense float64 oracle (manifold/reference.py's
``riemannion_step``), over the same seeds and shapes as the primitives of fixed_rank.py in
tests/test_geometry.py, for two steps so the transported momentum enters the second.

The fused calls are those of ``Riemannion._update`` written out (no engine, one process, fp64).
Tolerance: as test_geometry (1e-10): a handful of fp64 matmuls, CholeskyQR2 and a 2r×2r SVD per
step against dense SVDs; a wrong block, sign or transposition shows up at O(1).
"""

from __future__ import annotations

import pytest
import torch
from test_geometry import CASES, IDS, TOL, dense, rand_point, rel

from riemann_zero.linalg import polar_factor
from riemann_zero.manifold import fixed_rank as geo
from riemann_zero.manifold import reference as ref
from riemann_zero.manifold import span

F64 = torch.float64
B = 3
LR, BETA, WD = 0.1, 0.9, 0.5


def _fused(x: geo.Point, g: torch.Tensor, prev: geo.Tangent | None, buffer: str
           ) -> tuple[geo.Point, geo.Tangent]:
    """One Riemannion step as the optimizer computes it (lr_scale none, SVD polar)."""
    g_u, g_k = g @ x.V, g.mT @ x.U  # the two products the PEFT backward gives
    m_u = g_u if prev is None else BETA * prev.dU + g_u
    m_k = g_k if prev is None else BETA * prev.dK + g_k
    sp, c_m, c_x = span.factor(x, m_u, m_k)
    c_d = span.tangent_part(polar_factor(c_m, "svd", eps=1e-6))
    new, w1, z1 = span.truncate(sp, (1.0 - LR * WD) * c_x - LR * c_d, x.U.shape[-1])
    return new, span.transport(sp, c_m if buffer == "raw" else c_d, w1, z1)


@pytest.mark.parametrize("buffer", ["raw", "direction"])
@pytest.mark.parametrize(("seed", "shape"), CASES, ids=IDS)
def test_fused_step_is_the_dense_riemannion_step(seed, shape, buffer):
    """Two fused steps (the second with the transported momentum) give the dense oracle's points;
    the momentum carried to the new point is the oracle's buffer projected there, and the new
    factors are orthonormal."""
    m, n, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = rand_point(gen, B, m, n, r)
    grads = [torch.randn(B, m, n, generator=gen, dtype=F64) for _ in range(2)]
    x1, mom1 = _fused(x, grads[0], None, buffer)
    x2, _ = _fused(x1, grads[1], mom1, buffer)
    eye = torch.eye(r, dtype=F64)
    for y in (x1, x2):
        assert float((y.U.mT @ y.U - eye).norm()) < TOL and float((y.V.mT @ y.V - eye).norm()) < TOL
    for i in range(B):
        dense_x = x.U[i] @ x.K[i].mT
        want1, u1, v1, buf1 = ref.riemannion_step(x.U[i], x.V[i], dense_x, grads[0][i], None,
                                                  lr=LR, beta=BETA, weight_decay=WD,
                                                  buffer=buffer)
        assert rel(x1.U[i] @ x1.K[i].mT, want1) < TOL
        assert rel(dense(x1, mom1)[i], ref.project(u1, v1, buf1)) < TOL
        want2, *_ = ref.riemannion_step(u1, v1, want1, grads[1][i], buf1, lr=LR, beta=BETA,
                                        weight_decay=WD, buffer=buffer)
        assert rel(x2.U[i] @ x2.K[i].mT, want2) < TOL
