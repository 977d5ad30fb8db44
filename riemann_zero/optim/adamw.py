"""The one AdamW update of the package (torch.optim.AdamW's formulas, arXiv 1711.05101).

Used by every optimizer here for the parameters that are not manifold adapters, and by StelLA
for the directions of U, S and V::

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
    d = (m / (1 − β₁ᵗ)) / (√v / √(1 − β₂ᵗ) + ε)
    p ← (1 − η λ) p − η d                      (decoupled weight decay λ)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adamw_direction", "adamw_update_", "adamw_group_step_", "closure_loss"]


def adamw_direction(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, step: float | Tensor,
                    beta1: float, beta2: float, eps: float) -> Tensor:
    """Update the moments in place and return the bias-corrected direction d.

    ``step`` (t ≥ 1) is a number, or a tensor broadcastable against ``grad`` when stacked
    parameters have taken different numbers of steps.
    """
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    if isinstance(step, Tensor):
        bias1, bias2 = bias1.to(grad.dtype), bias2.to(grad.dtype)
    root2 = bias2.sqrt() if isinstance(bias2, Tensor) else math.sqrt(bias2)
    denom = exp_avg_sq.sqrt().div_(root2).add_(eps)
    return exp_avg.div(bias1).div_(denom)


@torch.no_grad()
def adamw_update_(p: Tensor, state: dict, *, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> None:
    """One AdamW step of parameter p from ``p.grad`` (nothing without a gradient).

    ``state`` (torch.optim's per-parameter dict) gets ``step``, ``exp_avg`` and ``exp_avg_sq``;
    the moments of a low-precision (bf16/fp16) parameter are kept in fp32, fp64 stays fp64.
    """
    if p.grad is None:
        return
    dtype = torch.promote_types(p.dtype, torch.float32)
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
    state["step"] += 1
    d = adamw_direction(state["exp_avg"], state["exp_avg_sq"], p.grad.to(dtype), state["step"],
                        *betas, eps)
    update = p.to(dtype)  # p itself when fp32/fp64: updated in place
    update.mul_(1.0 - lr * weight_decay).add_(d, alpha=-lr)
    if update is not p:
        p.copy_(update)


def adamw_group_step_(group: dict, state: dict) -> None:
    """One AdamW step of every parameter of a torch.optim param group (lr, betas, eps,
    weight_decay from the group; ``state`` is the optimizer's per-parameter state)."""
    for p in group["params"]:
        adamw_update_(p, state[p], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                      weight_decay=group["weight_decay"])


def closure_loss(closure) -> Tensor | None:
    """torch.optim's closure convention: re-evaluate the loss with grad enabled, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
