"""Tensorion's geometry: unfoldings of a tensor of any order and the LMO of its tensor norm.

arXiv 2606.25975 (abstract; docs/design.md §8). For a tensor M of shape (n₀, …, n_{d−1})
and a proper subset τ of the modes, the unfolding M_(τ) is the (Π_{i∈τ} nᵢ) × (Π_{i∉τ} nᵢ)
matrix obtained by permuting the modes to (τ, τᶜ) and reshaping. M_(τᶜ) = M_(τ)ᵀ, so the
admissible set is the 2^{d−1} − 1 subsets that contain mode 0 (:func:`unfoldings`; for d = 2
only τ = {0}, M itself).

The norm whose unit ball is the convex hull of every unfolding's spectral-norm ball has the dual
norm max_τ ‖M_(τ)‖_*, and its linear-minimisation oracle is −D with

    τ* = argmax_τ ‖M_(τ)‖_*,   M_(τ*) = U Σ Vᵀ,   D = fold_τ*(U Vᵀ),   ⟨M, D⟩ = ‖M_(τ*)‖_*.

"online" selection computes τ* (nuclear norms from the Gram of each unfolding's smaller side,
‖A‖_* = Σ √λᵢ(A Aᵀ)); "offline" fixes τ from the shape alone: the most square unfolding (largest
min(rows, cols); ties go to the first τ of :func:`unfoldings`). On matrices both give Muon's
U Vᵀ. Everything is batched over a leading dimension of same-shaped tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from riemann_zero import linalg

__all__ = ["UNFOLDINGS", "unfoldings", "unfold_shape", "unfold", "fold", "offline_unfolding",
           "nuclear_norms", "online_unfolding", "lmo", "tensorion_direction"]

UNFOLDINGS = ("online", "offline")


def unfoldings(order: int) -> tuple[tuple[int, ...], ...]:
    """The admissible row-mode sets τ of a tensor of ``order`` modes: every proper subset that
    contains mode 0, ordered by the bit mask Σ_{i∈τ} 2^i (so τ = (0,) comes first)."""
    if order < 2:
        raise ValueError(f"unfoldings need a tensor of order >= 2, but got order {order}")
    out = []
    for mask in range(1, 1 << order):
        tau = tuple(i for i in range(order) if mask >> i & 1)
        if 0 in tau and len(tau) < order:
            out.append(tau)
    return tuple(out)


def unfold_shape(shape: tuple[int, ...], tau: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the unfolding M_(τ) of a tensor of ``shape``."""
    rows = math.prod(shape[i] for i in tau)
    return rows, math.prod(shape) // rows if rows else 0


def _perm(order: int, tau: tuple[int, ...]) -> list[int]:
    return list(tau) + [i for i in range(order) if i not in tau]


def unfold(m: Tensor, tau: tuple[int, ...]) -> Tensor:
    """M_(τ) of a batch of tensors m (b, n₀, …, n_{d−1}) → (b, rows, cols)."""
    shape = tuple(m.shape[1:])
    rows, cols = unfold_shape(shape, tau)
    perm = [0] + [1 + i for i in _perm(len(shape), tau)]
    return m.permute(perm).reshape(m.shape[0], rows, cols)


def fold(mat: Tensor, tau: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`unfold`: (b, rows, cols) → (b, *shape)."""
    perm = _perm(len(shape), tau)
    permuted = mat.reshape(mat.shape[0], *[shape[i] for i in perm])
    inverse = [0] + [1 + perm.index(i) for i in range(len(shape))]
    return permuted.permute(inverse).contiguous()


def offline_unfolding(shape: tuple[int, ...]) -> int:
    """Index (into :func:`unfoldings`) of the most square unfolding of ``shape``: the largest
    min(rows, cols), ties to the smallest index (the rule depends on the shape alone)."""
    taus = unfoldings(len(shape))
    sizes = [min(unfold_shape(tuple(shape), t)) for t in taus]
    return sizes.index(max(sizes))


def nuclear_norms(m: Tensor) -> Tensor:
    """‖M_(τ)‖_* for every admissible τ, for a batch m (b, *shape) → (b, len(unfoldings)).

    Each from the eigenvalues of the Gram of the unfolding's smaller side, in fp64 (one product
    of the inputs' dtype per unfolding, then a k×k eigh with k = min(rows, cols)).
    """
    out = []
    for tau in unfoldings(m.ndim - 1):
        a = unfold(m, tau)
        small = a @ a.mT if a.shape[-2] <= a.shape[-1] else a.mT @ a
        lam = torch.linalg.eigvalsh(small.double())
        out.append(lam.clamp_min(0).sqrt().sum(-1))
    return torch.stack(out, dim=-1)


def online_unfolding(m: Tensor) -> Tensor:
    """Index of τ* = argmax_τ ‖M_(τ)‖_* for each tensor of a batch (b, *shape) → (b,) long
    (ties to the smallest index)."""
    return nuclear_norms(m).argmax(dim=-1)


def lmo(m: Tensor, taus: Tensor | list[int], ortho: str = "svd", ns_steps: int = 5) -> Tensor:
    """D = fold_τ(polar(M_(τ))) for each tensor of a batch (b, *shape), τ = unfoldings[taus[i]].

    Tensors sharing a τ go through one batched polar call (:func:`linalg.polar_factor`; its
    ``"newton_schulz"`` runs on the wide orientation of each unfolding, as Muon does).
    """
    shape = tuple(m.shape[1:])
    all_taus = unfoldings(len(shape))
    idx = torch.as_tensor(taus, dtype=torch.long).reshape(-1).tolist()
    if len(idx) != m.shape[0]:
        raise ValueError(f"lmo: {m.shape[0]} tensors but {len(idx)} unfoldings")
    out = torch.empty_like(m)
    for k in sorted(set(idx)):
        rows = [i for i, t in enumerate(idx) if t == k]
        tau = all_taus[k]
        part = m[rows] if len(rows) < len(idx) else m
        d = fold(linalg.polar_factor(unfold(part, tau), ortho, ns_steps), tau, shape)
        out[rows] = d.to(m.dtype)
    return out


def tensorion_direction(M: Tensor, unfolding: str = "online", ortho: str = "svd",  # noqa: N803
                        ns_steps: int = 5) -> Tensor:
    """Tensorion's LMO direction D of one tensor M (order ≥ 2): the descent step is −lr·D.

    Args:
        M: the tensor (momentum or gradient), any shape with at least two modes.
        unfolding: ``"online"`` (τ* = argmax ‖M_(τ)‖_*, the exact LMO: ⟨M, D⟩ = max_τ ‖M_(τ)‖_*)
            or ``"offline"`` (the most square unfolding of M's shape).
        ortho: ``"svd"`` (exact polar) or ``"newton_schulz"`` (Muon's iteration).
        ns_steps: Newton–Schulz iterations.

    Returns:
        D, same shape and dtype as M. A 2-D M gives Muon's U Vᵀ.
    """
    if unfolding not in UNFOLDINGS:
        raise ValueError(f"unfolding must be one of {UNFOLDINGS}, but got {unfolding!r}")
    if ortho not in linalg.POLAR_METHODS:
        raise ValueError(f"ortho must be one of {linalg.POLAR_METHODS}, but got {ortho!r}")
    if M.ndim < 2:
        raise ValueError(f"tensorion_direction needs a tensor of order >= 2, but got shape "
                         f"{tuple(M.shape)}")
    batch = M.unsqueeze(0)
    online = unfolding == "online"
    taus = online_unfolding(batch) if online else [offline_unfolding(tuple(M.shape))]
    return lmo(batch, taus, ortho, ns_steps)[0]
