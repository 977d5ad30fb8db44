"""Initialisations of stock PEFT LoRA adapters for the baselines: PiSSA, LoRA-GA (PEFT's own)
and StelLA's orthonormal U S Vᵀ.

PiSSA and LoRA-GA both start from a non-zero adapter B₀A₀ and move the frozen base weight to W −
s·B₀A₀, so the model's output is unchanged at step 0 (PiSSA: top-r SVD of W; LoRA-GA: SVD of the
full gradient from a few calibration batches). An adapter trained that way only reproduces the model
on the *moved* base; :func:`riemann_zero.adapters.export.save_peft_adapter` rewrites it, as PEFT's
own ``path_initial_model_for_weight_conversion`` does, into a plain LoRA of rank 2r on the original
base: ΔW = s(BA − B₀A₀) = s [B | −B₀] [A ; A₀], with alpha doubled so that s is unchanged.

The initial factors are kept on the model (CPU, as saved) under :data:`INITIAL_ATTR`; every rank
builds the same ones: PiSSA is a function of W, and LoRA-GA's gradients are all-reduced over the
data-parallel ranks and its randomized SVD seeded identically (the driver seeds before building).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from riemann_zero.adapters.layout import lora_adapters, rank_error
from riemann_zero.linalg import householder_basis

__all__ = ["PEFT_INITS", "INITIAL_ATTR", "peft_init_model", "STELLA_INITS", "FACTORS_ATTR",
           "stella_init", "s_vt"]

PEFT_INITS = ("pissa", "lora_ga")
INITIAL_ATTR = "_rz_initial_factors"
# Initialisations of the StelLA reference (``SonyResearch/stella`` at fa5d066, layer.py:149-202)
# plus the zero-S ablation (paper Table 5). "rando" (their default, config.py:141-149 and the
# recipe's INIT): Haar-orthonormal U, V, S = I.
STELLA_INITS = ("rando", "zero_s", "svd_major", "svd_minor")
FACTORS_ATTR = "_stella_factors"  # {adapter_name: (U, S, V)} written by stella_init


def _lora_ga_gradients(base: nn.Module, config: Any, calibration: list[dict],
                       reduce: Callable[[Tensor], Any] | None, world: int) -> None:
    """Attach LoRA-GA's averaged full gradient to each target layer (PEFT's preprocessing)."""
    from peft import preprocess_loraga
    from peft.tuners.lora.loraga import get_target_modules

    if not calibration:
        raise ValueError("init.method=lora_ga needs calibration batches; set init.batches >= 1")

    def train_step() -> None:  # PEFT divides the summed gradient by the number of backwards
        for batch in calibration:
            base(**batch).loss.backward()

    with warnings.catch_warnings():  # PEFT's counting hooks fire on outputs only: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(base, config, train_step)
    if reduce is None:
        return
    for _, module in get_target_modules(base, config):
        grad = module._peft_loraga_grad
        total = grad.float()
        reduce(total)  # in-place sum over ranks: every rank factorises the same gradient
        module._peft_loraga_grad = (total / world).to(grad.dtype)


def peft_init_model(base: nn.Module, config: Any, method: str, *, calibration: list[dict],
                    niter: int = 0, reduce: Callable[[Tensor], Any] | None = None,
                    world: int = 1) -> nn.Module:
    """``get_peft_model`` with PiSSA or LoRA-GA initialisation; keeps B₀, A₀ for saving.

    Args:
        base: the base model (its target weights are moved by the init).
        config: a ``peft.LoraConfig``; its ``init_lora_weights`` is set here.
        method: ``"pissa"`` or ``"lora_ga"``.
        calibration: batches (with ``labels``) whose mean gradient LoRA-GA factorises.
        niter: PiSSA's randomized-SVD iterations (0 = exact SVD, PEFT's ``"pissa"``).
        reduce: in-place sum over data-parallel ranks (None for one process).
        world: number of data-parallel ranks (to turn the sum into a mean).
    """
    from peft import LoraGAConfig, get_peft_model, get_peft_model_state_dict

    if method == "pissa":
        config.init_lora_weights = f"pissa_niter_{niter}" if niter else "pissa"
    elif method == "lora_ga":
        config.init_lora_weights = "lora_ga"
        config.lora_ga_config = LoraGAConfig()  # the paper's defaults: ArB2r, stable, gamma 16
        _lora_ga_gradients(base, config, calibration, reduce, world)
    else:
        raise ValueError(f"unknown PEFT init {method!r}; choose one of {list(PEFT_INITS)}")
    model = get_peft_model(base, config)
    initial = {k: v.detach().to("cpu", copy=True)
               for k, v in get_peft_model_state_dict(model).items()}
    object.__setattr__(model, INITIAL_ATTR, initial)  # a plain attribute, not a module buffer
    return model


# ------------------------------------------------------------------------------------ StelLA
def _haar(rows: int, r: int, gen: torch.Generator) -> Tensor:
    """Haar-random rows×r orthonormal columns (what nn.init.orthogonal_ draws, layer.py:170)."""
    return householder_basis(torch.randn(rows, r, generator=gen, dtype=torch.float64),
                             positive_diag=True)


def s_vt(s: Tensor, v: Tensor, diag: bool) -> Tensor:
    """A = S Vᵀ (batched); diagonal S stored as a vector."""
    return s.unsqueeze(-1) * v.mT if diag else s @ v.mT


@torch.no_grad()
def stella_init(peft_model: nn.Module, seed: int = 0, init: str = "rando",
                diag_s: bool = False) -> int:
    """Initialise every LoRA adapter of ``peft_model`` as U S Vᵀ (B = U, A = S Vᵀ) in place.

    Args:
        peft_model: a model wrapped with stock ``peft.get_peft_model`` (LoRA, any lora_alpha).
        seed: seed of the random orthonormal bases (the same seed gives the same adapters).
        init: ``"rando"`` (reference default, layer.py:169-175: Haar-orthonormal U and V, S = I;
            the model output CHANGES by s·U Vᵀ, as in the reference); ``"zero_s"`` (same bases,
            S = 0: the output is unchanged at step 0); ``"svd_major"``/``"svd_minor"`` (U, V = the
            top/bottom r singular vectors of the base weight, S = I; layer.py:177-202).
        diag_s: S diagonal (the published recipe's ``--stella_diag_s True``) instead of a free
            r×r matrix (the config default, config.py:104-107).

    Returns:
        The number of adapters initialised.
    """
    if init not in STELLA_INITS:
        raise ValueError(f"init must be one of {STELLA_INITS}, but got {init!r}")
    gen = torch.Generator().manual_seed(int(seed))
    slots = lora_adapters(peft_model)
    for sl in slots:
        problem = rank_error(sl.r, sl.m, sl.n, sl.name)  # orthonormal U and V need r <= m, n
        if problem is not None:
            raise ValueError(problem)
        if init.startswith("svd"):
            w = sl.module.get_base_layer().weight.detach().to("cpu", torch.float64)
            left, _, right_t = torch.linalg.svd(w, full_matrices=False)
            cols = slice(0, sl.r) if init == "svd_major" else slice(-sl.r, None)
            u, v = left[:, cols], right_t[cols].mT
        else:
            u, v = _haar(sl.m, sl.r, gen), _haar(sl.n, sl.r, gen)
        fill = 0.0 if init == "zero_s" else 1.0
        s = torch.full((sl.r,), fill, dtype=torch.float64)
        if not diag_s:
            s = torch.diag(s)
        b, a = sl.lora_B, sl.lora_A
        master = torch.promote_types(b.dtype, torch.float32)
        u, s, v = (t.to(device=b.device, dtype=master).contiguous() for t in (u, s, v))
        b.copy_(u)
        a.copy_(s_vt(s, v, diag_s))
        factors = getattr(sl.module, FACTORS_ATTR, None)
        if factors is None:
            factors = {}
            setattr(sl.module, FACTORS_ATTR, factors)  # plain attribute: not in any state_dict
        factors[sl.adapter_name] = (u, s, v)
    return len(slots)
