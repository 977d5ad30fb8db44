"""RiemannLoRA optimizers (arXiv 2507.12142 v1 / v2 appendix C): Riemannian heavy-ball SGD and an
Adam-like variant, on the same fixed-rank geometry as Riemannion but without orthogonalisation."""

from __future__ import annotations

from torch import Tensor, nn

from riemann_zero.adapters.layout import Adapter
from riemann_zero.linalg import reduce_sum
from riemann_zero.manifold import fixed_rank as geo
from riemann_zero.manifold import span
from riemann_zero.optim.base import ManifoldOptimizer, adamw_group, fixed_rank_groups

__all__ = ["RiemannSGD", "RiemannAdam"]


class RiemannSGD(ManifoldOptimizer):
    """Riemannian heavy-ball SGD (RiemannLoRA)::

        ξ = P_T(G);   M = β · T(M_prev) + ξ;   X' = SVD_r((1 − ηλ) X − η M)
    """

    def __init__(self, model: nn.Module | list[Adapter], lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, adamw_lr: float | None = None,
                 adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0, params: list[nn.Parameter] | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        groups, adapters = fixed_rank_groups(
            model, defaults, adamw_group(lr, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay),
            params)
        super().__init__(groups, defaults, adapters=adapters)

    def _update(self, group: dict, bucket: list[Adapter], x: geo.Point, g_u: Tensor, g_k: Tensor,
                states: list[dict], shards) -> geo.Point:
        rm, rn = shards.reduce_m, shards.reduce_n
        lr = group["lr"]
        beta = group["momentum"]
        prev = self._get_tangent(states, "momentum")
        m_u = g_u if prev is None else beta * prev.dU + g_u  # factor() projects out the U-part
        m_k = g_k if prev is None else beta * prev.dK + g_k
        sp, c_m, c_x = span.factor(x, m_u, m_k, rm, rn)
        decay = 1.0 - lr * group["weight_decay"]
        new, w1, z1 = span.truncate(sp, decay * c_x - lr * c_m, x.U.shape[-1])
        self._put_tangent(states, "momentum", span.transport(sp, c_m, w1, z1))
        return new


class RiemannAdam(ManifoldOptimizer):
    """Adam-like RiemannLoRA: transported first moment, one second-moment scalar per factor block.

    The tangent vector splits into two orthogonal blocks, U̇ Vᵀ and U K̇ᵀ, whose norms ‖U̇‖, ‖K̇‖
    depend on X only. Each block gets its own second moment, the mean square of its entries::

        ξ = P_T(G);  M = β₁ T(M_prev) + (1 − β₁) ξ
        v_U = β₂ v_U + (1 − β₂) ‖U̇‖²/(m r),   v_K likewise with n r
        X' = SVD_r((1 − ηλ) X − η (M̂_U / (√v̂_U + ε), M̂_K / (√v̂_K + ε)))   (bias-corrected)
    """

    def __init__(self, model: nn.Module | list[Adapter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, adamw_lr: float | None = None,
                 adamw_weight_decay: float = 0.0, params: list[nn.Parameter] | None = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups, adapters = fixed_rank_groups(
            model, defaults, adamw_group(lr, adamw_lr, betas, eps, adamw_weight_decay), params)
        super().__init__(groups, defaults, adapters=adapters)

    def _update(self, group: dict, bucket: list[Adapter], x: geo.Point, g_u: Tensor, g_k: Tensor,
                states: list[dict], shards) -> geo.Point:
        rm, rn = shards.reduce_m, shards.reduce_n
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
        m_dim, n_dim, r = bucket[0].m, bucket[0].n, bucket[0].r
        xi = geo.rgrad(x, g_u, g_k, rm)
        prev = self._get_tangent(states, "exp_avg")
        m = geo.scale(xi, 1 - beta1) if prev is None else geo.add(
            geo.scale(prev, beta1), geo.scale(xi, 1 - beta1))
        sq_u = reduce_sum((xi.dU.double() ** 2).sum((-2, -1)), rm) / (m_dim * r)
        sq_k = reduce_sum((xi.dK.double() ** 2).sum((-2, -1)), rn) / (n_dim * r)
        v_u, v_k = self._get(states, "exp_avg_sq_U"), self._get(states, "exp_avg_sq_K")
        v_u = (1 - beta2) * sq_u if v_u is None else beta2 * v_u + (1 - beta2) * sq_u
        v_k = (1 - beta2) * sq_k if v_k is None else beta2 * v_k + (1 - beta2) * sq_k
        t = states[0]["step"]  # counted by the base class before this call
        c1, c2 = 1 - beta1**t, 1 - beta2**t
        sp, c_m, c_x = span.factor(x, m.dU, m.dK, rm, rn)
        c_step = span.split_blocks(c_m, 1 / (c1 * ((v_u / c2).sqrt() + eps)),
                                   1 / (c1 * ((v_k / c2).sqrt() + eps)))
        decay = 1.0 - lr * group["weight_decay"]
        new, w1, z1 = span.truncate(sp, decay * c_x - lr * c_step, x.U.shape[-1])
        self._put_tangent(states, "exp_avg", span.transport(sp, c_m, w1, z1))
        self._put(states, "exp_avg_sq_U", v_u)
        self._put(states, "exp_avg_sq_K", v_k)
        return new


