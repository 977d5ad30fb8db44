"""riemann-zero: LoRA adapters on the fixed-rank manifold, moved by Riemannion, scaled with ZeRO.

Public names only; the package is built in floors (``linalg``/``io`` → ``manifold``/``sharding``/
``data`` → ``adapters`` → ``optim`` → ``train``), each importing only the floors below it.
"""

from __future__ import annotations

from riemann_zero.adapters.export import save_adapter
from riemann_zero.adapters.inits import stella_init
from riemann_zero.adapters.layout import (
    Adapter,
    convert,
    find_adapters,
    get_peft_model,
    manifold_points,
    set_point,
)
from riemann_zero.adapters.loi import loi_init
from riemann_zero.adapters.merge import merge_adapters
from riemann_zero.adapters.placement import fsdp_placement
from riemann_zero.manifold.tensor import tensorion_direction
from riemann_zero.optim.base import ManifoldOptimizer, manifold_health
from riemann_zero.optim.riemannion import Riemannion
from riemann_zero.optim.riemannlora import RiemannAdam, RiemannSGD
from riemann_zero.optim.stella import StelLA
from riemann_zero.optim.tensorion import Tensorion
from riemann_zero.sharding.comm import sketch_reduce

__all__ = [
    "Adapter",
    "ManifoldOptimizer",
    "RiemannAdam",
    "RiemannSGD",
    "Riemannion",
    "StelLA",
    "Tensorion",
    "convert",
    "find_adapters",
    "fsdp_placement",
    "get_peft_model",
    "loi_init",
    "manifold_health",
    "manifold_points",
    "merge_adapters",
    "save_adapter",
    "set_point",
    "sketch_reduce",
    "stella_init",
    "tensorion_direction",
]
__version__ = "0.1.0"

