"""Baseline optimizers for LoRA, built exactly as their authors' libraries ship them (their names
are rows of :mod:`riemann_zero.optim.registry`, the only table of optimizer names).

- ``adamw``: ``torch.optim.AdamW`` on every trainable parameter (PEFT's default LoRA init:
  Kaiming-uniform A, zero B). Riemannion paper, Table 4: lr 2e-4, weight decay 0.01.
- ``muon``: per-factor Muon, i.e. ``torch.optim.Muon`` on each 2-D ``lora_A``/``lora_B`` weight
  separately (Table 1's "Muon" row: lr 5e-4, weight decay 0.2, momentum 0.95), AdamW on any other
  trainable parameter (``torch.optim.Muon`` rejects non-2-D tensors).
- ``rprec_adamw``: PEFT's Riemannian-preconditioned AdamW (Zhang & Pilanci, arXiv 2402.02347),
  ``peft.optimizers.create_riemannian_optimizer(model, torch.optim.AdamW, lr=..., reg=...)``
  (Table 4: lr 5e-4, weight decay 0.5). It rescales ``p.grad`` of the model's own LoRA
  parameters, so it needs an engine that hands those parameters to the optimizer unchanged
  (DeepSpeed ZeRO stage 0 in fp32, or no engine).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CombinedOptimizer", "adamw_lora", "muon_lora", "rprec_adamw"]


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped together, seen by LR schedulers as one.

    ``param_groups`` is the concatenation of the children's groups (the same dict objects), so a
    scheduler that writes ``group["lr"]`` drives every child.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer, but got none")
        self.optimizers = optimizers
        self.defaults = {}
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        merged: dict[Any, Any] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError(f"state_dict holds {None if states is None else len(states)} "
                             f"optimizer states, but this CombinedOptimizer has "
                             f"{len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, states):
            opt.load_state_dict(sd)
        # load_state_dict replaces each child's group dicts: re-share them.
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters; was the LoRA adapter attached?")
    return named


def adamw_lora(model: nn.Module, *, lr: float, weight_decay: float = 0.0,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               amsgrad: bool = False) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` on every trainable parameter of a PEFT LoRA model."""
    params = [p for _, p in _trainable(model)]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                             eps=eps, amsgrad=amsgrad)


def muon_lora(model: nn.Module, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              nesterov: bool = True, ns_steps: int = 5,
              adjust_lr_fn: str | None = None) -> torch.optim.Optimizer:
    """``torch.optim.Muon`` on each 2-D lora_A/lora_B weight (per factor), AdamW (``betas``,
    ``eps``) on any other trainable parameter."""
    named = _trainable(model)

    def is_factor(n: str, p: nn.Parameter) -> bool:
        return p.ndim == 2 and (".lora_A." in n or ".lora_B." in n)

    factors = [p for n, p in named if is_factor(n, p)]
    others = [p for n, p in named if not is_factor(n, p)]
    if not factors:
        raise ValueError("optimizer muon found no 2-D lora_A/lora_B weights in the model")
    muon = torch.optim.Muon(factors, lr=lr, weight_decay=weight_decay, momentum=momentum,
                            nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
    if not others:
        return muon
    return CombinedOptimizer([muon, torch.optim.AdamW(
        others, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)])


def rprec_adamw(model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                reg: float = 0.01) -> torch.optim.Optimizer:
    """PEFT's ``create_riemannian_optimizer(model, torch.optim.AdamW, ...)``; ``reg`` damps the
    r x r preconditioner."""
    from peft.optimizers import create_riemannian_optimizer

    _trainable(model)
    return create_riemannian_optimizer(model, torch.optim.AdamW, reg=reg, lr=lr,
                                       weight_decay=weight_decay, betas=tuple(betas), eps=eps)
