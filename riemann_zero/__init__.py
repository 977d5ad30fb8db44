"""riemann-zero: LoRA adapters on the fixed-rank manifold, moved by Riemannion, scaled with ZeRO."""

from __future__ import annotations

from .layout import Adapter, convert, find_adapters, get_peft_model, manifold_points, save_adapter
from .loi import loi_init
from .manifold_optimizer import ManifoldOptimizer
from .riemannion import Riemannion
from .riemannlora import RiemannAdam, RiemannSGD
from .stella import StelLA, stella_init

__all__ = [
    "StelLA",
    "stella_init",
    "Adapter",
    "ManifoldOptimizer",
    "RiemannAdam",
    "RiemannSGD",
    "Riemannion",
    "convert",
    "find_adapters",
    "get_peft_model",
    "loi_init",
    "manifold_health",
    "manifold_points",
    "save_adapter",
]
__version__ = "0.1.0"


def manifold_health(obj) -> dict[str, float]:
    """Manifold health of an optimizer's fp32 masters (or, given a model, of its parameters)."""
    if isinstance(obj, ManifoldOptimizer):
        return obj.manifold_health()
    import torch

    worst = 0.0
    for ad in find_adapters(obj):
        u = ad.lora_B[:, ad.r:].detach().double()
        worst = max(worst, float((u.mT @ u - torch.eye(ad.r, dtype=torch.float64)).norm()))
    return {"orth_err_U": worst}
