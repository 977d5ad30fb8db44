"""Batched small linear algebra, pure torch: the one home of every orthonormaliser of the package.

Tall tensors carry a leading batch dimension b (all adapters of one shape are handled in one
call) and may be row blocks of the full matrix: every sum over rows goes through a ``reduce``
(an all-reduce across the ranks holding the rows, or ``None`` for a single process). Rows of
padding must be zero; zero rows change no sum.

Precision: tall products run in the dtype of the inputs (fp32 or fp64); Grams, cores and their
eigen/singular decompositions run in fp64 (they are tiny).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "Reduce",
    "NS_COEFFS",
    "GRAM_RTOL",
    "reduce_sum",
    "gram",
    "mm",
    "orthonormalize",
    "complete",
    "sym_powers",
    "POLAR_METHODS",
    "polar",
    "ns_polar",
    "polar_factor",
    "polar_tall",
    "householder_basis",
]

Reduce = Callable[[Tensor], Tensor] | None

# Quintic Newton–Schulz coefficients from Muon (Keller Jordan, KellerJordan/Muon muon.py).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# The ways of computing a polar factor (:func:`polar_factor`): exact SVD, or Muon's iteration.
POLAR_METHODS = ("svd", "newton_schulz")
# Directions of a tall block whose Gram eigenvalue is below GRAM_RTOL·‖block‖_F² are treated as zero
# (σ ratio ≈ 3e-7: below what an fp32 factor resolves; the fp64 Gram itself is exact to ~1e-16).
GRAM_RTOL = 1e-13


def reduce_sum(t: Tensor, reduce: Reduce) -> Tensor:
    """``t`` summed over the ranks that hold parts of it (``reduce=None``: this rank holds all)."""
    return t if reduce is None else reduce(t)


def gram(a: Tensor, b: Tensor, reduce: Reduce) -> Tensor:
    """aᵀ b summed over row blocks, returned in fp64.

    The product runs in the inputs' dtype (upcasting a tall fp32 block costs more than the whole
    step); in fp32 the two-pass orthonormalisation below still reaches ~1e-7 orthogonality.
    """
    return reduce_sum((a.mT @ b).double(), reduce)


def mm(a: Tensor, small: Tensor) -> Tensor:
    """Tall (b, rows, k) times small (b, k, l), in the tall tensor's dtype."""
    return a @ small.to(a.dtype)


def orthonormalize(a: Tensor, basis: Tensor | None, reduce: Reduce
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a = basis·C + Q·R with Q orthonormal and ⊥ basis, by Gram eigendecompositions.

    Two passes (as CholeskyQR2) restore orthogonality lost to the squared condition number. Rank
    deficient directions get zero columns in Q and zero rows in R (no NaN, no noise amplified).
    Returns Q (same shape as a), R (b,k,k), C (b,r,k) (empty if basis is None) and the (b,k) mask
    of the columns of Q that are real (not zeroed). Collectives: two small reductions.
    """
    b, _, k = a.shape
    c = a.new_zeros(b, 0 if basis is None else basis.shape[-1], k, dtype=torch.float64)
    r = torch.eye(k, dtype=torch.float64, device=a.device).expand(b, k, k)
    q = a
    for _ in range(2):
        if basis is None:
            g = gram(q, q, reduce)
            scale = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1, keepdim=True)
        else:
            both = reduce_sum(torch.cat([basis.mT @ q, q.mT @ q], dim=-2).double(), reduce)
            coef, g = both[:, : basis.shape[-1]], both[:, basis.shape[-1]:]
            # Rank tests are relative to ‖q‖² BEFORE the basis part is removed: if q lies in
            # span(basis) (always when basis is square, r = n), the residual is rounding noise
            # and must be dropped, which a test relative to the residual's own λ_max never does.
            scale = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1, keepdim=True)
            g = g - coef.mT @ coef  # (q − basis·coef)ᵀ(q − basis·coef), basis orthonormal
            q = torch.baddbmm(q, basis, coef.to(q.dtype), alpha=-1.0)
            c = c + coef @ r
        lam, vec = torch.linalg.eigh((g + g.mT) / 2)
        keep = lam > GRAM_RTOL * scale.clamp_min(1e-300)
        root = lam.clamp_min(0).sqrt()
        inv = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
        q = mm(q, vec * inv.unsqueeze(-2))
        r = (torch.where(keep, root, 0.0).unsqueeze(-1) * vec.mT) @ r
    # Masked directions stay masked in the second pass (their Gram rows are zero), so this ``keep``
    # marks the non-zero columns of q.
    return q, r, c, keep


def complete(w: Tensor, valid: Tensor, good: Tensor) -> Tensor:
    """Replace the columns of w (b,k,l) that ``good`` (b,l) marks False by an orthonormal
    completion of the good ones inside the ``valid`` (b,k) coordinates.

    Columns of singular vectors with a zero singular value are arbitrary null vectors and may
    point at zeroed basis columns; completing them keeps the new factor orthonormal when a
    retracted matrix has rank < r. Rare path.
    """
    w = w.clone()
    for i in torch.nonzero(~good.all(-1)).flatten().tolist():
        kept = w[i][:, good[i]]
        cand = torch.diag(valid[i].to(w.dtype))
        cand = cand - kept @ (kept.mT @ cand)
        basis = torch.linalg.svd(cand)[0]
        w[i][:, ~good[i]] = basis[:, : int((~good[i]).sum())]
    return w


def sym_powers(g: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """G^{-1/2} and G^{1/2} of symmetric positive (semi-)definite Grams, eigenvalues ≥ ``floor``."""
    lam, vec = torch.linalg.eigh((g + g.mT) / 2)
    lam = lam.clamp_min(floor)
    return (vec * lam.rsqrt().unsqueeze(-2)) @ vec.mT, (vec * lam.sqrt().unsqueeze(-2)) @ vec.mT


def polar(c: Tensor, eps: float = 1e-6) -> Tensor:
    """Polar factor of small cores by SVD, with directions σ < eps·σ_max dropped (zero → zero)."""
    w, sigma, zt = torch.linalg.svd(c, full_matrices=False)  # rectangular cores too
    keep = sigma > eps * sigma[:, :1].clamp_min(1e-300)
    return (w * keep.unsqueeze(-2)) @ zt


def ns_polar(core: Tensor, steps: int) -> Tensor:
    """Approximate polar factor of cores by Muon's quintic Newton–Schulz iteration, in the cores'
    dtype (fp64 for the 2r×2r cores; wide cores are cheapest: x xᵀ is then the small Gram).
    A zero core gives zero."""
    a, b, c = NS_COEFFS
    tiny = torch.finfo(core.dtype).tiny
    x = core / core.norm(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x


def polar_factor(a: Tensor, method: str = "svd", ns_steps: int = 5, eps: float = 1e-6) -> Tensor:
    """Polar factor U Vᵀ of a batch of matrices (b, rows, cols): the one dispatcher on ``method``.

    ``"svd"``: exact (:func:`polar`), directions with σ < eps·σ_max dropped (zero → zero).
    ``"newton_schulz"``: Muon's quintic iteration (:func:`ns_polar`, ``ns_steps`` iterations), run
    on the wide orientation as Muon does, in the input's dtype; singular values land in about
    [0.7, 1.2], not exactly 1. Used for Riemannion's 2r×2r cores and Tensorion's unfoldings.
    """
    if method == "svd":
        return polar(a, eps)
    if method == "newton_schulz":
        tall = a.shape[-2] > a.shape[-1]
        x = ns_polar(a.mT if tall else a, ns_steps)
        return x.mT if tall else x
    raise ValueError(f"ortho must be one of {POLAR_METHODS}, but got {method!r}")


def polar_tall(y: Tensor) -> Tensor:
    """Polar factor Y (YᵀY)^{-1/2} of a batch of whole (unsharded) tall matrices, fp64 r×r eigh.

    Equals the SVD polar U_y V_yᵀ in exact arithmetic; well conditioned whenever YᵀY ⪰ I (as
    after a tangent step on the Stiefel manifold).
    """
    inv_sqrt, _ = sym_powers(y.mT.double() @ y.double(), 1e-30)
    return (y.double() @ inv_sqrt).to(y.dtype)


def householder_basis(a: Tensor, *, positive_diag: bool = False) -> Tensor:
    """Orthonormal basis of the columns of a whole matrix by fp64 Householder QR.

    ``positive_diag=True`` fixes the signs so that R has a non-negative diagonal (then the Q of a
    Gaussian matrix is Haar-distributed, as ``nn.init.orthogonal_`` draws it). A zero input gives
    coordinate axes.
    """
    q, r = torch.linalg.qr(a.double())
    if not positive_diag:
        return q
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    return q * torch.sign(d).where(d != 0, 1.0).unsqueeze(-2)
