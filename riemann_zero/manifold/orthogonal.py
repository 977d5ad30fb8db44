"""Orthogonal blocks: Cayley maps, SO(b) log/exp/geodesics, OrthoFuse merging, spectra restoration.

Every tensor carries leading batch dimensions (all blocks of all layers of one block size are
handled in one call); the last two are the b×b block. Pure torch, float64 in, float64 out.

Conventions (PEFT's, which stores one vector of b(b−1)/2 entries per block):

- ``skew(vec)``: S with the upper triangle (above the diagonal, row-major) equal to ``vec``,
  S = U − Uᵀ.
- the *exact* Cayley map R = cayley(S) = (I − S)(I + S)⁻¹, inverse S = (I + R)⁻¹(I − R) (PEFT's
  OFT with ``use_cayley_neumann=False``, and BOFT with S = ½(X − Xᵀ) of a stored b×b matrix X);
- PEFT OFT's ``use_cayley_neumann=True`` evaluates I + 2S + 2S² + … + Sᵏ⁻¹, the truncated
  Neumann series of (I + S)(I − S)⁻¹ = cayley(−S): the same map with the opposite generator sign.
  :func:`generator` turns a stored vector into the exact-form generator either way.

A rotation with no eigenvalue −1 has angles θ ∈ (−π, π); with iS = V diag(σ) Vᴴ (Hermitian, so V
is unitary even when angles repeat, as they do near the identity), R = V diag(e^{2i·arctan σ}) Vᴴ
and log R = V diag(2i·arctan σ) Vᴴ: the log goes through the Cayley generator and one Hermitian
eigendecomposition, never through a non-normal eigensolver.

Merging (OrthoFuse, arXiv 2604.05183; ``t`` is the position from the first rotation, t = 0, to
the second, t = 1):

- ``geodesic``: R(t) = R₁ exp(t log(R₁ᵀ R₂)), the SO(b) geodesic;
- ``orthofuse``: R(t) = cayley((1 − t) S₁ + t S₂), OrthoFuse's fast Cayley-space interpolation;
- spectra restoration: interpolating two unrelated rotations shrinks the angles (by ~1/√2 at
  t = ½). The generator of the merged block is scaled by 2η(t) = 1 + 4t(1 − t) (η(t) = ½ +
  2t(1 − t), OrthoFuse's factor): tan(θ'/2) = 2η(t)·tan(θ/2) per angle, ≈ θ' = (1 + 4t(1−t))·θ
  for small angles (R^{1+4t(1−t)}: the angles double at t = ½), and exactly nothing at t = 0, 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "n_skew",
    "block_size_of",
    "skew",
    "unskew",
    "cayley",
    "cayley_inverse",
    "neumann_cayley",
    "generator",
    "so_log",
    "so_exp",
    "angles",
    "geodesic",
    "orthofuse",
    "restore_factor",
    "eta",
    "restore",
]


def n_skew(b: int) -> int:
    """Number of free entries of a b×b skew-symmetric matrix, b(b−1)/2."""
    return b * (b - 1) // 2


def block_size_of(n_elements: int) -> int:
    """The block size b with b(b−1)/2 = ``n_elements``.

    Raises:
        ValueError: ``n_elements`` is not a triangular number.
    """
    b = int(round((1 + math.sqrt(1 + 8 * n_elements)) / 2))
    if n_skew(b) != n_elements:
        raise ValueError(f"{n_elements} entries is not the upper triangle of a square block")
    return b


def _eye(b: int, like: Tensor) -> Tensor:
    return torch.eye(b, dtype=like.dtype, device=like.device)


def skew(vec: Tensor, b: int | None = None) -> Tensor:
    """(..., b(b−1)/2) → (..., b, b): upper triangle (row-major) = ``vec``, S = U − Uᵀ."""
    b = block_size_of(vec.shape[-1]) if b is None else b
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    out = vec.new_zeros(*vec.shape[:-1], b, b)
    out[..., rows, cols] = vec
    return out - out.mT


def unskew(s: Tensor) -> Tensor:
    """(..., b, b) skew → (..., b(b−1)/2): its upper triangle, the inverse of :func:`skew`."""
    b = s.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=s.device)
    return s[..., rows, cols]


def cayley(s: Tensor) -> Tensor:
    """R = (I − S)(I + S)⁻¹ for skew S (orthogonal, det 1, no eigenvalue −1)."""
    eye = _eye(s.shape[-1], s)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def cayley_inverse(r: Tensor) -> Tensor:
    """S = (I + R)⁻¹(I − R), the skew generator with cayley(S) = R (R without eigenvalue −1).

    The result is skew-symmetrised, which removes the rounding of a nearly orthogonal R.
    """
    eye = _eye(r.shape[-1], r)
    s = torch.linalg.solve(eye + r, eye - r)
    return 0.5 * (s - s.mT)


def neumann_cayley(s: Tensor, terms: int = 5) -> Tensor:
    """PEFT OFT's ``use_cayley_neumann`` matrix: I + 2S + 2S² + … + 2Sᵏ⁻² + Sᵏ⁻¹ (k = ``terms``),
    the truncated series of cayley(−S) (not exactly orthogonal)."""
    out = _eye(s.shape[-1], s).expand_as(s).clone()
    if terms > 1:
        out = out + 2 * s
        if terms > 2:
            power = s @ s
            out = out + 2 * power
            for _ in range(3, terms - 1):
                power = power @ s
                out = out + 2 * power
            out = out + power @ s
    return out


def generator(vec: Tensor, *, neumann: bool, b: int | None = None) -> Tensor:
    """Exact-form generator S (R = cayley(S)) of PEFT OFT's stored vector: skew(vec), or its
    negative when the adapter was trained with ``use_cayley_neumann`` (see the module docstring)."""
    s = skew(vec, b)
    return -s if neumann else s


def _hermitian_parts(s: Tensor) -> tuple[Tensor, Tensor]:
    """σ, V with i·S = V diag(σ) Vᴴ (complex128 V)."""
    return torch.linalg.eigh(1j * s.to(torch.complex128))


def so_log(r: Tensor) -> Tensor:
    """Principal logarithm of rotations (skew, angles in (−π, π)); via the Cayley generator."""
    sigma, v = _hermitian_parts(cayley_inverse(r))
    lam = (2j * torch.arctan(sigma)).to(v.dtype)
    return ((v * lam.unsqueeze(-2)) @ v.mH).real.to(r.dtype)


def so_exp(a: Tensor) -> Tensor:
    """exp(A) of skew A (a rotation)."""
    return torch.linalg.matrix_exp(a)


def angles(r: Tensor) -> Tensor:
    """Rotation angles θ (the eigenvalues e^{iθ}), sorted ascending, shape (..., b)."""
    sigma, _ = _hermitian_parts(cayley_inverse(r))
    return torch.sort(2 * torch.arctan(sigma), dim=-1).values.to(r.dtype)


def geodesic(r1: Tensor, r2: Tensor, t: float) -> Tensor:
    """R(t) = R₁ exp(t log(R₁ᵀ R₂)): R(0) = R₁, R(1) = R₂, constant speed in SO(b)."""
    return r1 @ so_exp(t * so_log(r1.mT @ r2))


def orthofuse(s1: Tensor, s2: Tensor, t: float) -> Tensor:
    """OrthoFuse's fast path: cayley((1 − t) S₁ + t S₂) for exact-form generators S₁, S₂."""
    return cayley((1 - t) * s1 + t * s2)


def eta(t: float) -> float:
    """OrthoFuse's restoration coefficient η(t) = ½ + 2t(1 − t)."""
    return 0.5 + 2 * t * (1 - t)


def restore_factor(t: float) -> float:
    """The factor 2η(t) = 1 + 4t(1 − t) applied to the merged generator (1 at t = 0, 1; 2 at ½)."""
    return 2 * eta(t)


def restore(r: Tensor, t: float) -> Tensor:
    """Spectra restoration of a merged rotation: cayley(2η(t)·cayley⁻¹(R)), so that every angle
    obeys tan(θ'/2) = (1 + 4t(1 − t))·tan(θ/2)."""
    return cayley(restore_factor(t) * cayley_inverse(r))
