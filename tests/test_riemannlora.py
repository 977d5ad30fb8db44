"""RiemannSGD and RiemannAdam against dense float64 versions written here from
reference.project/truncate (same tiny fp64 PEFT Llama and tolerance as test_riemannion)."""

from __future__ import annotations

import pytest
import torch
from test_riemannion import TOL, backward, bases, batch, build, points, rel

import riemann_zero as rz
from riemann_zero.manifold import reference as ref


def dense_sgd(u, v, x, g, mom, *, lr, beta, wd):
    """ξ = P_T(G); M = β P_T(M_prev) + ξ; X' = SVD_r((1 − ηλ)X − ηM)."""
    m = ref.project(u, v, g) + (0 if mom is None else beta * ref.project(u, v, mom))
    return ref.truncate((1 - lr * wd) * x - lr * m, u.shape[1]), m


def dense_adam(u, v, x, g, st, *, lr, betas, eps, wd, t):
    """Adam with one second moment per orthogonal block of the tangent vector:
    block U̇Vᵀ = (I − UUᵀ)ξ (mean square over m·r entries of U̇), block U K̇ᵀ = UUᵀξ (over n·r)."""
    (b1, b2), (mm, nn_), r = betas, x.shape, u.shape[1]
    pu = u @ u.mT
    xi = ref.project(u, v, g)
    m = (1 - b1) * xi + (0 if st.get("m") is None else b1 * ref.project(u, v, st["m"]))
    blocks = {"U": lambda z: z - pu @ z, "K": lambda z: pu @ z}
    size = {"U": mm * r, "K": nn_ * r}
    step = torch.zeros_like(x)
    for key, part in blocks.items():
        sq = float(part(xi).norm() ** 2) / size[key]
        st[key] = (1 - b2) * sq + b2 * st.get(key, 0.0)
        step += part(m) / ((1 - b1**t) * ((st[key] / (1 - b2**t)) ** 0.5 + eps))
    st["m"] = m
    return ref.truncate((1 - lr * wd) * x - lr * step, r)


@pytest.mark.parametrize("wd", [0.0, 0.2])
def test_riemann_sgd_matches_dense(tiny_llama, wd):
    model = build(tiny_llama, seed=10)
    opt = rz.RiemannSGD(model, lr=0.05, momentum=0.9, weight_decay=wd)
    mom = {}
    for t in range(5):
        x, uv = points(model), bases(model)
        g = backward(model, batch(t))
        want = {}
        for k in x:
            want[k], mom[k] = dense_sgd(*uv[k], x[k], g[k], mom.get(k), lr=0.05, beta=0.9, wd=wd)
        opt.step()
        got = points(model)
        assert max(rel(got[k], want[k]) for k in want) < TOL


def test_riemann_adam_matches_dense(tiny_llama):
    model = build(tiny_llama, seed=11)
    opt = rz.RiemannAdam(model, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    states: dict[str, dict] = {}
    for t in range(1, 6):
        x, uv = points(model), bases(model)
        g = backward(model, batch(t))
        want = {k: dense_adam(*uv[k], x[k], g[k], states.setdefault(k, {}), lr=0.01,
                              betas=(0.9, 0.99), eps=1e-8, wd=0.1, t=t) for k in x}
        opt.step()
        got = points(model)
        assert max(rel(got[k], want[k]) for k in want) < TOL


@pytest.mark.parametrize(("cls", "kwargs"), [
    (rz.RiemannSGD, dict(lr=-1.0)), (rz.RiemannSGD, dict(momentum=1.0)),
    (rz.RiemannSGD, dict(weight_decay=-0.1)), (rz.RiemannAdam, dict(betas=(0.9, 1.0))),
    (rz.RiemannAdam, dict(eps=0.0)), (rz.RiemannAdam, dict(lr=float("nan"))),
])
def test_bad_hyper_parameters_raise(tiny_llama, cls, kwargs):
    with pytest.raises(ValueError, match="but got"):
        cls(build(tiny_llama, dtype=torch.float32), **kwargs)


def test_zero_gradient_no_nan_pure_decay(tiny_llama):
    """No backward at all on the first step (no momentum yet): X' = (1 − ηλ) X exactly in rank."""
    for cls in (rz.RiemannSGD, rz.RiemannAdam):
        model = build(tiny_llama, seed=12)
        x = points(model)
        cls(model, lr=0.1, weight_decay=0.5).step()
        got = points(model)
        for k in x:
            assert bool(torch.isfinite(got[k]).all())
            assert rel(got[k], 0.95 * x[k]) < TOL
