"""The Stiefel manifold {X ∈ R^{rows×r} : XᵀX = I}, batched, as StelLA moves U and V on it.

Formulas of the StelLA reference (``SonyResearch/stella`` at fa5d066, ``stella/tuner/
stiefel.py``), with X in its tall (rows × r) orientation and whole (unsharded) matrices:

- canonical Riemannian gradient  ξ = ∇ − X ∇ᵀ X                (stiefel.py:10-11)
- tangent projection             Δ ↦ Δ − X sym(XᵀΔ)            (stiefel.py:15-16)
- polar retraction               X ↦ polar(X + Δ)              (stiefel.py:42-44)
"""

from __future__ import annotations

from torch import Tensor

from riemann_zero.linalg import polar_tall

__all__ = ["rgrad", "project", "retract"]


def rgrad(x: Tensor, g: Tensor) -> Tensor:
    """Canonical Riemannian gradient ∇ − X ∇ᵀ X of the Euclidean gradient ∇ at X."""
    return g - x @ (g.mT @ x)


def project(x: Tensor, delta: Tensor) -> Tensor:
    """Orthogonal projection of Δ onto the tangent space at X: Δ − X sym(XᵀΔ)."""
    return delta - x @ (0.5 * (x.mT @ delta + delta.mT @ x))


def retract(x: Tensor, delta: Tensor) -> Tensor:
    """Polar retraction: the orthonormal factor of X + Δ."""
    return polar_tall(x + delta)
