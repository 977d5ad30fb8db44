"""The rank-2r PEFT-native block layout of a manifold adapter.

Each adapter X = U Kᵀ (rank r) is stored as a standard PEFT LoRA of rank 2r and scaling 1::

    lora_B = [Z | U]   (m × 2r)        lora_A = [Vᵀ ; Kᵀ]   (2r × n)        Z = 0

so B A = Z Vᵀ + U Kᵀ = X, and one ordinary backward gives ∂L/∂Z = G V (first r columns of
lora_B.grad) and ∂L/∂K = Gᵀ U (last r rows of lora_A.grad, transposed). Target matching, dropout,
saving and loading all stay PEFT's. Adapters are found by module name, never by parameter order.

After LOI the frozen base weight is W − ΔW₀; ΔW₀ = B₀ A₀ is kept as buffers ``loi_B0``/``loi_A0``
on the LoRA layer (see :mod:`riemann_zero.adapters.export` for the adapter relative to the
ORIGINAL base).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from riemann_zero.linalg import householder_basis
from riemann_zero.sharding.params import assign, full_tensor, gathered, layout_of

__all__ = [
    "Adapter",
    "get_peft_model",
    "init_points",
    "convert",
    "find_adapters",
    "manifold_points",
    "set_point",
    "lora_layers",
    "lora_adapters",
    "rank_error",
    "RANK_ATTR",
]

RANK_ATTR = "_riemann_rank"


@dataclass(frozen=True)
class Adapter:
    """One manifold adapter: a PEFT LoRA layer in the rank-2r block layout."""

    name: str  # module path inside the PEFT model's ``base_model.model``
    module: nn.Module
    adapter_name: str
    r: int
    m: int  # out features
    n: int  # in features

    @property
    def lora_A(self) -> nn.Parameter:  # (2r, n): [Vᵀ ; Kᵀ]
        return self.module.lora_A[self.adapter_name].weight

    @property
    def lora_B(self) -> nn.Parameter:  # (m, 2r): [Z | U]
        return self.module.lora_B[self.adapter_name].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter_name])


def lora_layers(model: nn.Module):
    """(name, module) of every PEFT LoRA layer, names relative to ``base_model.model``."""
    from peft.tuners.lora import LoraLayer

    root = model.base_model.model if hasattr(model, "base_model") else model
    for name, module in root.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A"):
            yield name, module


def _in_out(module: nn.Module) -> tuple[int, int]:
    return int(module.out_features), int(module.in_features)


@torch.no_grad()
def set_point(ad: Adapter, u: Tensor, v: Tensor, k: Tensor) -> None:
    """Write X = U Kᵀ (V spanning range K) into the adapter's PEFT parameters, with Z = 0.

    Under an engine (ZeRO-1/2/3, FSDP2) only this rank's part is written, together with the
    engine's fp32 master copy; nothing is gathered. u, v, k are the full factors (the same on
    every rank).
    """
    a, b = ad.lora_A, ad.lora_B
    if not (layout_of(a).whole and layout_of(b).whole):
        assign(b, torch.cat([torch.zeros_like(u), u], dim=1))
        assign(a, torch.cat([v, k], dim=1).mT)
        return
    r = ad.r
    b[:, :r].zero_()
    b[:, r:].copy_(u)
    a[:r].copy_(v.mT)
    a[r:].copy_(k.mT)


def rank_error(r: int, m: int, n: int, name: str) -> str | None:
    """Why rank r cannot be an adapter of the (m × n) module ``name`` (None if it can).

    The one rank rule of the package: a rank-r matrix of shape m × n exists iff 1 ≤ r ≤ min(m, n).
    Recipe preflight and the layout both ask this function.
    """
    if r < 1:
        return f"rank r must be a positive integer, but got r={r}"
    if r > min(m, n):
        return (f"rank r={r} is larger than min(out, in)=min({m}, {n}) of target module {name!r}: "
                f"a rank-r matrix of that shape does not exist. Fix: use r <= {min(m, n)} or drop "
                f"this module from target_modules.")
    return None


def _check_rank(r: int, name: str, m: int, n: int) -> None:
    problem = rank_error(r, m, n, name)
    if problem is not None:
        raise ValueError(problem)


def get_peft_model(model: nn.Module, lora_config, init: str = "zero", seed: int = 0,
                   init_scale: float = 1e-3) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters in the manifold layout.

    Args:
        model: a transformers model (or any module PEFT can adapt).
        lora_config: a stock ``peft.LoraConfig`` whose ``r`` is the manifold rank r.
            ``lora_alpha`` is ignored (the layout's scaling is 1; scale enters through the lr).
        init: ``"zero"``: X = 0 with random orthonormal U and V (the paper's orthonormal-factor,
            zero-other-factor start); ``"random"``: random orthonormal U, K ~ N(0, init_scale²);
            LOI is applied afterwards with :func:`riemann_zero.loi_init`.
        seed: seed of the random bases (the same on every rank).
    """
    from peft import get_peft_model as peft_get_peft_model

    if init not in ("zero", "random"):
        raise ValueError(
            f"init must be 'zero' or 'random' (LOI: call loi_init after), but got {init!r}")
    if getattr(lora_config, "use_dora", False):
        raise ValueError("use_dora=True is not a fixed-rank adapter; set use_dora=False")
    r = int(lora_config.r)
    if r < 1:
        raise ValueError(f"r must be a positive integer, but got {r}")
    config = copy.deepcopy(lora_config)
    config.r, config.lora_alpha, config.use_rslora = 2 * r, 2 * r, False
    config.init_lora_weights = True
    peft_model = peft_get_peft_model(model, config)
    init_points(_mark(peft_model, r), init, seed=seed, init_scale=init_scale)
    return peft_model


def init_points(adapters: list[Adapter], init: str, *, seed: int = 0,
                init_scale: float = 1e-3) -> None:
    """Reset manifold adapters to the start ``init`` of :func:`get_peft_model` (``"zero"`` or
    ``"random"``), bases drawn from ``seed`` in the order given (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    for ad in adapters:
        r = ad.r
        u = householder_basis(torch.randn(ad.m, r, generator=gen, dtype=torch.float64))
        v = householder_basis(torch.randn(ad.n, r, generator=gen, dtype=torch.float64))
        if init == "zero":
            k = torch.zeros(ad.n, r, dtype=torch.float64)
        else:
            k = init_scale * torch.randn(ad.n, r, generator=gen, dtype=torch.float64)
            v = householder_basis(k)
        set_point(ad, u, v, k)


def _mark(peft_model: nn.Module, r: int | None) -> list[Adapter]:
    """Set the manifold rank on every LoRA layer (r=None: half the PEFT rank) and check it fits."""
    found = []
    for name, module in lora_layers(peft_model):
        for adapter_name in module.lora_A:
            rank = r if r is not None else int(module.r[adapter_name]) // 2
            m, n = _in_out(module)
            _check_rank(rank, name, m, n)
            if int(module.r[adapter_name]) != 2 * rank:
                raise ValueError(
                    f"{name}: PEFT rank {module.r[adapter_name]} is not 2r = {2 * rank}")
            module.scaling[adapter_name] = 1.0
            setattr(module, RANK_ATTR, rank)
            found.append(Adapter(name, module, adapter_name, rank, m, n))
    if not found:
        raise ValueError("no LoRA layers found: wrap the model with PEFT (target_modules) first")
    return found


@torch.no_grad()
def convert(peft_model: nn.Module) -> list[Adapter]:
    """Convert a stock PEFT LoRA model (rank r, any scaling) in place to the manifold layout.

    X = s·B·A is kept exactly: B = Q_B R_B, Aᵀ = Q_A R_A, SVD of s·R_B R_Aᵀ = W Σ Zᵀ gives
    U = Q_B W, V = Q_A Z, K = V Σ. The LoRA modules are replaced by rank-2r ones and the config
    updated, so saving/loading stays PEFT's.
    """
    converted = []
    for name, module in lora_layers(peft_model):
        if hasattr(module, RANK_ATTR):
            raise ValueError(f"{name} is already in the manifold layout")
        for adapter_name in list(module.lora_A):
            a_old = module.lora_A[adapter_name].weight
            b_old = module.lora_B[adapter_name].weight
            r = a_old.shape[0]
            m, n = _in_out(module)
            _check_rank(r, name, m, n)
            s = float(module.scaling[adapter_name])
            qb, rb = torch.linalg.qr(b_old.double())
            qa, ra = torch.linalg.qr(a_old.double().mT)
            w, sigma, zt = torch.linalg.svd(s * rb @ ra.mT)
            u, v = qb @ w, qa @ zt.mT
            k = v * sigma
            dtype, device = a_old.dtype, a_old.device
            kw = dict(bias=False, dtype=dtype, device=device)
            module.lora_A[adapter_name] = nn.Linear(n, 2 * r, **kw)
            module.lora_B[adapter_name] = nn.Linear(2 * r, m, **kw)
            module.r[adapter_name] = 2 * r
            module.lora_alpha[adapter_name] = 2 * r
            module.scaling[adapter_name] = 1.0
            setattr(module, RANK_ATTR, r)
            ad = Adapter(name, module, adapter_name, r, m, n)
            set_point(ad, u, v, k)
            converted.append(ad)
    if not converted:
        raise ValueError("no LoRA layers found: wrap the model with peft.get_peft_model first")
    for cfg in peft_model.peft_config.values():
        cfg.r, cfg.lora_alpha, cfg.use_rslora = 2 * cfg.r, 2 * cfg.r, False
    return converted


def find_adapters(model: nn.Module) -> list[Adapter]:
    """All manifold adapters of a PEFT model, in module order (active adapters only)."""
    found = []
    for name, module in lora_layers(model):
        rank = getattr(module, RANK_ATTR, None)
        if rank is None:
            continue
        for adapter_name in module.active_adapters:
            if adapter_name in module.lora_A:
                m, n = _in_out(module)
                found.append(Adapter(name, module, adapter_name, rank, m, n))
    if not found:
        raise ValueError(
            "no manifold adapters in this model: build it with riemann_zero.get_peft_model(...) or "
            "convert a PEFT LoRA model with riemann_zero.convert(...)"
        )
    return found


def lora_adapters(model: nn.Module) -> list[Adapter]:
    """Every active adapter of a stock PEFT LoRA model (rank r = PEFT's rank), in module order.

    For optimizers that keep PEFT's own parametrisation (StelLA): plain LoRA on ``nn.Linear``.
    """
    found = []
    for name, module in lora_layers(model):
        for adapter_name in module.active_adapters:
            if adapter_name not in module.lora_A:
                continue
            if module.use_dora.get(adapter_name, False):
                raise ValueError(f"{name}: StelLA needs plain LoRA, but got use_dora=True")
            if getattr(module, "fan_in_fan_out", False):
                raise ValueError(
                    f"{name}: StelLA supports nn.Linear targets, but got fan_in_fan_out=True")
            m, n = _in_out(module)
            found.append(Adapter(name, module, adapter_name, int(module.r[adapter_name]), m, n))
    if not found:
        raise ValueError("no LoRA layers found, but got a model without adapters: wrap it with "
                         "peft.get_peft_model(model, LoraConfig(target_modules=...)) first")
    return found


def manifold_points(model: nn.Module) -> dict[str, Tensor]:
    """For every adapted module, the current point X (m×n, rank r) that the optimizer moves.

    The module's effective weight is its (possibly LOI-shifted) base weight plus X.
    """
    points = {}
    for ad in find_adapters(model):
        with gathered([ad.lora_A, ad.lora_B]):
            b, a = full_tensor(ad.lora_B).detach(), full_tensor(ad.lora_A).detach()
            dtype = torch.promote_types(b.dtype, torch.float32)  # fp64 stays fp64
            points[ad.name] = ad.scaling * (b.to(dtype) @ a.to(dtype))
    return points
