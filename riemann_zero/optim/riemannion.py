"""Riemannion: Muon on the manifold of rank-r matrices.

arXiv 2507.12142 v2, Algorithm 4, with the corrections of docs/design.md §2 (raw momentum,
retraction of (1 − ηλ)X − ηD).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from riemann_zero.adapters.layout import Adapter
from riemann_zero.linalg import polar_factor
from riemann_zero.manifold import fixed_rank as geo
from riemann_zero.manifold import span
from riemann_zero.optim.base import RMS_MATCH, ManifoldOptimizer, adamw_group, fixed_rank_groups

__all__ = ["Riemannion"]


class Riemannion(ManifoldOptimizer):
    r"""Riemannion for LoRA adapters in the manifold layout.

    For each adapter X = U Kᵀ (batched over adapters of one shape), with G = ∇_W L::

        ξ    = P_T(G)                                  # from G V and Gᵀ U (one backward)
        M    = β · T(M_prev) + ξ                       # heavy-ball momentum, transported
        D    = P_T(polar(M))                           # Muon direction, back in the tangent space
        X'   = SVD_r((1 − ηλ) X − η D)                 # decoupled weight decay, SVD retraction
        store T_{X→X'}(M)                              # raw M ("raw", default) or D ("paper")

    Every quantity depends on X only, never on how X is factored. Cost O((m+n) r² + r³) per
    adapter; collectives only on r×r / 2r×r blocks.

    Args:
        model: PEFT model in the manifold layout (``riemann_zero.get_peft_model``/``convert``) or
            a list of :class:`Adapter` plus ``params`` for the AdamW group.
        lr: η. Paper (Llama-3-8B, r = 16): 1e-4.
        momentum: β. Paper: 0.9.
        weight_decay: λ, decoupled, on ΔW. Paper: 0.00316.
        ortho: ``"svd"`` (exact polar, the paper's) or ``"newton_schulz"`` (Muon's quintic NS on
            the 2r×2r core).
        ns_steps: Newton–Schulz iterations.
        ortho_eps: singular directions below ortho_eps·σ_max are dropped from the polar factor.
        momentum_buffer: ``"raw"`` stores M (loss-scale invariant); ``"paper"`` stores D as the
            printed Algorithm 4 does (then the step depends on the loss scale).
        lr_scale: ``None`` or ``"rms"`` (η · 0.2·√max(m, n), Moonlight's RMS matching; not in the
            paper: sweep lr separately).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW group for trainable
            parameters that are not adapters (``adamw_lr=None``: same as ``lr``).
    """

    def __init__(self, model: nn.Module | list[Adapter], lr: float = 1e-4, momentum: float = 0.9,
                 weight_decay: float = 0.00316, *, ortho: str = "svd", ns_steps: int = 5,
                 ortho_eps: float = 1e-6, momentum_buffer: str = "raw", lr_scale: str | None = None,
                 adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.999),
                 adamw_eps: float = 1e-8, adamw_weight_decay: float = 0.0,
                 params: list[nn.Parameter] | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ortho=ortho,
                        ns_steps=ns_steps, ortho_eps=ortho_eps, momentum_buffer=momentum_buffer,
                        lr_scale=lr_scale)
        adamw = adamw_group(lr, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)
        groups, adapters = fixed_rank_groups(model, defaults, adamw, params)
        super().__init__(groups, defaults, adapters=adapters)

    def _update(self, group: dict, bucket: list[Adapter], x: geo.Point, g_u: Tensor, g_k: Tensor,
                states: list[dict], shards) -> geo.Point:
        rm, rn = shards.reduce_m, shards.reduce_n
        lr = group["lr"]
        if group["lr_scale"] == "rms":
            lr_step = lr * RMS_MATCH * math.sqrt(max(bucket[0].m, bucket[0].n))
        else:
            lr_step = lr
        prev = self._get_tangent(states, "momentum")  # already transported to x last step
        beta = group["momentum"]
        m_u = g_u if prev is None else beta * prev.dU + g_u  # factor() projects out the U-part
        m_k = g_k if prev is None else beta * prev.dK + g_k
        sp, c_m, c_x = span.factor(x, m_u, m_k, rm, rn)
        # polar(L C Rᵀ) = L polar(C) Rᵀ: the polar factor of the 2r×2r coordinates suffices
        c_d = span.tangent_part(polar_factor(c_m, group["ortho"], group["ns_steps"],
                                             group["ortho_eps"]))
        decay = 1.0 - lr * group["weight_decay"]
        new, w1, z1 = span.truncate(sp, decay * c_x - lr_step * c_d, x.U.shape[-1])
        keep = c_m if group["momentum_buffer"] == "raw" else c_d
        self._put_tangent(states, "momentum", span.transport(sp, keep, w1, z1))
        return new
