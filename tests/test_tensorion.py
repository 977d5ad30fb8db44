"""Tensorion's geometry (float64 properties against the dense oracle) and the optimizer (Muon on
matrices, logical shapes, AdamW for vectors, state round trip, bad input)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import riemann_zero as rz
from riemann_zero.linalg import polar_factor
from riemann_zero.manifold import reference as ref
from riemann_zero.manifold import tensor as geo

# Orders 2–5, a size-1 mode, tall/wide, square ties.
SHAPES = [(5, 7), (7, 5), (3, 4, 5), (4, 1, 6), (2, 3, 4, 5), (3, 3, 2, 2), (2, 1, 3, 2, 2)]
SEEDS = [0, 1]
# Float64 SVD/eigh round-off on tensors of norm ~10: 1e-10 leaves five orders of margin.
TOL = 1e-10


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_admissible_set_size():
    """2^{d−1} − 1 distinct unfoldings up to transposition; each contains mode 0."""
    for d in range(2, 7):
        taus = geo.unfoldings(d)
        assert len(taus) == 2 ** (d - 1) - 1 == len(set(taus))
        assert all(0 in t and len(t) < d for t in taus)


@pytest.mark.parametrize("shape", SHAPES)
def test_fold_unfold_identity(shape):
    m = _rand((3, *shape), 0)  # a batch of 3
    for tau in geo.unfoldings(len(shape)):
        mat = geo.unfold(m, tau)
        assert mat.shape[1:] == geo.unfold_shape(shape, tau)
        assert torch.equal(geo.fold(mat, tau, shape), m)
        assert torch.equal(mat[1], ref.tensor_unfold(m[1], tau))  # the oracle's definition


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_online_lmo_equals_dense_oracle(shape, seed):
    """⟨M, D⟩ = max over ALL bipartitions of ‖M_(τ)‖_* (brute force), D equals the oracle's, and
    the chosen unfolding of D has all singular values 1 (full rank)."""
    m = _rand(shape, seed)
    d = rz.tensorion_direction(m)  # online + SVD by default
    d_ref, _, value = ref.tensor_lmo(m)
    assert abs(float((m * d).sum()) - value) <= TOL * value
    assert float((d - d_ref).abs().max()) <= TOL
    nuc = geo.nuclear_norms(m[None])[0]
    assert abs(float(nuc.max()) - value) <= TOL * value  # Gram-based norms = SVD's
    tau = geo.unfoldings(len(shape))[int(nuc.argmax())]
    sv = torch.linalg.svdvals(geo.unfold(d[None], tau)[0])
    assert sv.numel() == min(geo.unfold_shape(shape, tau))
    assert float((sv - 1).abs().max()) <= TOL


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5), (2, 1, 3, 2, 2)])
def test_lmo_beats_random_feasible_points(shape):
    """No point of the norm ball from a random sample does better than D: extreme points of
    every unfolding's spectral ball (polar factors of random matrices, and of M's own
    unfoldings) and convex combinations of them."""
    m = _rand(shape, 3)
    best = float((m * rz.tensorion_direction(m)).sum())
    gen = torch.Generator().manual_seed(4)
    taus = geo.unfoldings(len(shape))
    points = []
    for tau in taus:
        rows, cols = geo.unfold_shape(shape, tau)
        own = polar_factor(geo.unfold(m[None], tau))  # best point of this ball
        points.append(geo.fold(own, tau, shape)[0])
        for _ in range(20):
            z = torch.randn(1, rows, cols, generator=gen, dtype=torch.float64)
            points.append(geo.fold(polar_factor(z), tau, shape)[0])
    for _ in range(100):
        w = torch.rand(len(points), generator=gen, dtype=torch.float64)
        points.append(sum(wi * p for wi, p in zip(w / w.sum(), points)))
    values = torch.tensor([float((m * p).sum()) for p in points], dtype=torch.float64)
    assert float(values.max()) <= best * (1 + TOL)
    assert float(values.max()) >= 0.5 * best  # the sample is not trivially weak


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5), (2, 1, 3, 2, 2)])
def test_mode_permutation_equivariance(shape):
    """Relabelling the modes relabels the direction: D(M ∘ π) = D(M) ∘ π (online; and offline
    where the most square unfolding is unique, which it is for these shapes after relabelling
    only up to the tie rule, so offline is checked through its chosen matrix shape)."""
    m = _rand(shape, 5)
    d = rz.tensorion_direction(m)
    for perm in [tuple(reversed(range(len(shape)))), (1, 0, *range(2, len(shape)))]:
        dp = rz.tensorion_direction(m.permute(perm).contiguous())
        assert float((dp - d.permute(perm)).abs().max()) <= TOL
        k = geo.offline_unfolding(shape)
        kp = geo.offline_unfolding(tuple(shape[i] for i in perm))
        assert min(geo.unfold_shape(shape, geo.unfoldings(len(shape))[k])) == min(
            geo.unfold_shape(tuple(shape[i] for i in perm), geo.unfoldings(len(shape))[kp]))


def test_order_two_is_muons_polar():
    m = _rand((6, 9), 6)
    u, _, vt = torch.linalg.svd(m, full_matrices=False)
    for unfolding in ("online", "offline"):
        d = rz.tensorion_direction(m, unfolding=unfolding)
        assert float((d - u @ vt).abs().max()) <= TOL
    # Newton–Schulz: torch.optim.Muon's own iteration runs in bf16; ours in the input's dtype.
    from torch.optim._muon import _zeropower_via_newtonschulz

    m32 = m.float()
    ours = rz.tensorion_direction(m32, ortho="newton_schulz")
    theirs = _zeropower_via_newtonschulz(m32, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    # bf16 has 8 mantissa bits: 5 iterations of a cubic polynomial leave ~1e-2 relative error.
    assert float((ours - theirs).norm() / theirs.norm()) <= 3e-2


def test_offline_rule():
    """Most square: largest min(rows, cols); ties go to the first τ (smallest bit mask)."""
    assert geo.unfoldings(4)[geo.offline_unfolding((64, 32, 3, 3))] == (0, 2)  # 192 × 96
    assert geo.unfoldings(4)[geo.offline_unfolding((32, 1, 3, 3))] == (0,)  # tie 32×9: first
    assert geo.offline_unfolding((8, 64, 64)) == geo.unfoldings(3).index((0, 1))  # 512 × 64


def test_online_picks_expert_mode_where_offline_does_not():
    """A stack of 8 experts W_e = U S_e Vᵀ sharing rank-3 row and column spaces (S_e random,
    independent): every unfolding that puts the expert mode with one matrix mode has rank ≤ 3,
    while the expert-mode unfolding M_(0) (8 × out·in, one row per expert) has rank
    min(8, 3²) = 8, so its nuclear norm is the largest and online picks it. Offline picks the
    most square (8·32) × 32 unfolding, blind to the structure (docs/design.md §8)."""
    gen = torch.Generator().manual_seed(7)
    u = torch.linalg.qr(torch.randn(32, 3, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(32, 3, generator=gen, dtype=torch.float64))[0]
    s = torch.randn(8, 3, 3, generator=gen, dtype=torch.float64)
    stack = u @ s @ v.mT + 1e-3 * torch.randn(8, 32, 32, generator=gen, dtype=torch.float64)
    taus = geo.unfoldings(3)
    assert taus[int(geo.online_unfolding(stack[None]))] == (0,)
    assert taus[geo.offline_unfolding((8, 32, 32))] == (0, 1)
    # Unstructured (noise-like) experts: online agrees with offline's most square choice.
    noise = torch.randn(1, 8, 32, 32, generator=gen, dtype=torch.float64)
    assert min(geo.unfold_shape((8, 32, 32), taus[int(geo.online_unfolding(noise))])) == 32


def test_batched_equals_looped_and_zero_is_zero():
    m = _rand((4, 3, 4, 5), 8)
    taus = geo.online_unfolding(m)
    batched = geo.lmo(m, taus, "svd")
    for i in range(4):
        assert torch.allclose(batched[i], rz.tensorion_direction(m[i]), atol=TOL, rtol=0)
    for ortho in ("svd", "newton_schulz"):
        z = geo.lmo(torch.zeros(2, 3, 4, 5), [0, 1], ortho)
        assert torch.equal(z, torch.zeros_like(z))


# ---------------------------------------------------------------------------------- optimizer
def _ns_fp64(grad, coefficients, steps, eps):
    """torch.optim.Muon's Newton–Schulz with its bf16 cast removed (fp64)."""
    a, b, c = coefficients
    x = grad.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (4, 9)])
def test_matrices_equal_torch_muon(monkeypatch, nesterov, shape):
    """On matrices Tensorion is torch.optim.Muon: the same momentum (theirs is (1 − β)· ours,
    and the polar factor is scale-free), weight decay and lr_scale="rms" ↔
    adjust_lr_fn="match_rms_adamw", once their Newton–Schulz runs at our precision."""
    import torch.optim._muon as muon

    monkeypatch.setattr(muon, "_zeropower_via_newtonschulz", _ns_fp64)
    w = torch.nn.Parameter(_rand(shape, 9))
    w2 = torch.nn.Parameter(w.detach().clone())
    ours = rz.Tensorion([w], lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    theirs = torch.optim.Muon([w2], lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov,
                              adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        g = _rand(shape, 100 + step)
        w.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert float((w - w2).detach().abs().max()) <= 1e-12
    assert float((w.detach() - _rand(shape, 9)).abs().max()) > 1e-3  # it moved


def test_step_equals_dense_reference():
    """p ← (1 − ηλ) p − η·0.2·√max(rows, cols)·D(b), D from the brute-force oracle (SVD)."""
    p = torch.nn.Parameter(_rand((3, 4, 5), 10))
    opt = rz.Tensorion([p], lr=0.05, momentum=0.8, weight_decay=0.1, unfolding="online",
                       ortho="svd")
    want, buf = p.detach().clone(), torch.zeros(3, 4, 5, dtype=torch.float64)
    for step in range(3):
        g = _rand((3, 4, 5), 20 + step)
        p.grad = g.clone()
        opt.step()
        buf = 0.8 * buf + g
        d, rows, _ = ref.tensor_lmo(buf)
        r = math.prod((3, 4, 5)[i] for i in rows)
        want = (1 - 0.05 * 0.1) * want - 0.05 * 0.2 * math.sqrt(max(r, 60 // r)) * d
    assert float((p.detach() - want).abs().max()) <= 1e-12


def test_logical_shape_and_vectors():
    """A fused QKV weight (3·heads·d × hidden) viewed as (3, heads, d, hidden) steps as that
    4-D tensor; a bias goes to the package AdamW (= torch.optim.AdamW)."""
    qkv = torch.nn.Parameter(_rand((3 * 2 * 4, 6), 11))
    bias = torch.nn.Parameter(_rand((6,), 12))
    bias2 = torch.nn.Parameter(bias.detach().clone())
    opt = rz.Tensorion([{"params": [qkv], "logical_shape": (3, 2, 4, 6)}, {"params": [bias]}],
                       lr=0.01, weight_decay=0.0, unfolding="online", ortho="svd",
                       lr_scale=None, adamw_betas=(0.9, 0.99))
    adam = torch.optim.AdamW([bias2], lr=0.01, betas=(0.9, 0.99), weight_decay=0.0)
    start = qkv.detach().clone()
    g = _rand((24, 6), 13)
    qkv.grad, bias.grad, bias2.grad = g.clone(), _rand((6,), 14), _rand((6,), 14)
    opt.step()
    adam.step()
    d = rz.tensorion_direction(g.view(3, 2, 4, 6)).view(24, 6)
    assert float((qkv.detach() - (start - 0.01 * d)).abs().max()) <= 1e-12
    assert float((bias - bias2).detach().abs().max()) <= 1e-12


def test_reselect_every_keeps_the_unfolding_between_selections():
    p = torch.nn.Parameter(_rand((4, 4, 4), 15))
    opt = rz.Tensorion([p], unfolding="online", reselect_every=3, momentum=0.0)
    chosen = []
    for step in range(6):
        p.grad = _rand((4, 4, 4), 40 + step)
        opt.step()
        chosen.append(opt.named_state["0.0"]["unfolding"])
        fresh = int(geo.online_unfolding(p.grad[None]))
        if step % 3 == 0:
            assert chosen[-1] == fresh  # momentum 0: the selection sees this gradient
        else:
            assert chosen[-1] == chosen[-2]


def test_state_dict_round_trip_and_resume():
    """state_dict → load into a fresh optimizer → identical state and an identical next step."""
    def make():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(_rand((4, 3, 5), 16)), torch.nn.Parameter(_rand((5,), 17))]
        return ps, rz.Tensorion(ps, unfolding="online", reselect_every=2)

    ps, opt = make()
    for step in range(3):
        for i, p in enumerate(ps):
            p.grad = _rand(p.shape, 50 + 10 * step + i)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    ps2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(ps2, ps):
            p.copy_(q)
    opt2.load_state_dict(sd)
    sd2 = opt2.state_dict()
    assert sd2["named_state"].keys() == sd["named_state"].keys()
    for k, st in sd["named_state"].items():
        assert st["step"] == sd2["named_state"][k]["step"]
        assert st["unfolding"] == sd2["named_state"][k]["unfolding"]
        assert torch.equal(st["momentum"], sd2["named_state"][k]["momentum"])
    for k, st in sd["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd2["state"][k][key]))
    for o, qs in ((opt, ps), (opt2, ps2)):
        for i, p in enumerate(qs):
            p.grad = _rand(p.shape, 99 + i)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2))


@pytest.mark.parametrize("kwargs,match", [
    ({"unfolding": "most_square"}, "unfolding must be one of"),
    ({"ortho": "qr"}, "ortho must be one of"),
    ({"lr_scale": "spectral"}, "lr_scale must be"),
    ({"reselect_every": 0}, "reselect_every"),
    ({"momentum": 1.0}, "momentum"),
])
def test_bad_hyper_parameters_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rz.Tensorion([torch.nn.Parameter(torch.zeros(3, 4))], **kwargs)


def test_bad_logical_shape_and_group_keys():
    p = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ValueError, match=r"logical_shape \(5, 5\) has 25 elements, but "
                                         r"parameter 0 of shape \(6, 4\) has 24"):
        rz.Tensorion([{"params": [p], "logical_shape": (5, 5)}])
    with pytest.raises(ValueError, match="unknown keys"):
        rz.Tensorion([{"params": [p], "unfold": "online"}])
    with pytest.raises(ValueError, match="unfolding must be one of"):
        rz.Tensorion([{"params": [p], "unfolding": "best"}])
    with pytest.raises(ValueError, match="unfolding must be one of"):
        rz.tensorion_direction(torch.zeros(2, 3), unfolding="square")
    with pytest.raises(ValueError, match="ortho must be one of"):
        rz.tensorion_direction(torch.zeros(2, 3), ortho="eigh")
    with pytest.raises(ValueError, match="order >= 2"):
        rz.tensorion_direction(torch.zeros(3))


def test_per_slice_is_per_expert_muon():
    """The benchmark's per-expert Muon baseline: each expert slice moves by its own polar."""
    p = torch.nn.Parameter(_rand((3, 4, 5), 18))
    start = p.detach().clone()
    opt = rz.Tensorion([{"params": [p], "per_slice": True}], lr=0.1, weight_decay=0.0,
                       ortho="svd")
    p.grad = _rand((3, 4, 5), 19)
    opt.step()
    for e in range(3):
        u, _, vt = torch.linalg.svd(p.grad[e], full_matrices=False)
        want = start[e] - 0.1 * 0.2 * math.sqrt(5) * (u @ vt)
        assert float((p[e].detach() - want).abs().max()) <= 1e-12
