"""The registry of optimizers: the only place where optimizer names live (the recipe driver and
the Hugging Face Trainer both read it).

One row per optimizer says how to build it, which adapter layout it needs, which initialisations
it accepts, where it runs and what it logs. Recipe validation, preflight, the builder and the
loop read the row; adding an optimizer is adding a row.

Hyper-parameters reach the builder two ways: the common recipe keys a row lists in
``recipe_keys`` (``optimizer.lr``, ``optimizer.momentum``, …) and ``optimizer.options``, a
mapping passed to the builder as keywords (its valid names: :meth:`OptimizerSpec.options`, the
builder's keyword parameters that no recipe key sets), e.g.
``optimizer.options.ortho=newton_schulz``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from riemann_zero.adapters.inits import stella_init
from riemann_zero.optim.baselines import adamw_lora, muon_lora, rprec_adamw
from riemann_zero.optim.riemannion import Riemannion
from riemann_zero.optim.riemannlora import RiemannAdam, RiemannSGD
from riemann_zero.optim.stella import StelLA
from riemann_zero.optim.tensorion import tensorion_model

__all__ = ["OptimizerSpec", "OPTIMIZERS", "INIT_METHODS", "LAYOUTS", "spec", "init_error",
           "engine_error", "adapter_error"]

# "manifold": the rank-2r manifold layout (riemann_zero.get_peft_model, LOI);
# "peft": stock PEFT LoRA modules of rank r (PEFT's own or PiSSA/LoRA-GA initialisation).
LAYOUTS = ("manifold", "peft")
INIT_METHODS = ("loi", "zero", "random", "peft", "pissa", "lora_ga")
_MANIFOLD_INITS = ("loi", "zero", "random")
_PEFT_INITS = ("peft", "pissa", "lora_ga")
# Keyword parameters of a builder that are not hyper-parameters.
_NOT_OPTIONS = ("model", "params", "name")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer as the driver sees it.

    Attributes:
        name: the value of ``optimizer.name``.
        build: ``build(model, **hyper_parameters)`` → a ``torch.optim.Optimizer``.
        recipe_keys: ``optimizer.*`` recipe keys passed to ``build`` under the same names.
        layout: the adapter layout it needs (one of :data:`LAYOUTS`).
        inits: the ``init.method`` values it accepts.
        init_hint: why other inits do not fit (completes the error message), or "".
        whole_factors: whether it needs the model's own 2-D LoRA weights and their grads, which
            only an engine that leaves parameters whole and unwrapped gives it (DeepSpeed ZeRO-0,
            one process or data parallel); ZeRO-1/2/3 and FSDP2 flatten or shard them.
        engine_hint: why engines that shard parameters do not fit, or "".
        bf16: whether it accepts ``deepspeed.bf16.enabled=true``.
        dtype_hint: why bf16 does not fit, or "".
        prepare: called as ``prepare(model, seed)`` after PEFT wrapped the model (StelLA's init).
        health: whether its ``manifold_health()`` is logged to metrics.jsonl.
        full_finetune: whether it can train whole parameters chosen by ``model.trainable``.
        orthogonal: whether it trains PEFT's orthogonal adapters (``adapter.type: oft|boft``).
        state_per_value: fp32 optimizer-state values it keeps per trainable value (the memory
            estimate's figure; AdamW's two moments: 2; the manifold optimizers' momentum factors
            U̇ (m×r) and K̇ (n×r) beside the rank-2r layout: 0.5). Checked against the real state
            in tests/train/test_memory.py.
    """

    name: str
    build: Callable[..., Any]
    recipe_keys: tuple[str, ...]
    layout: str
    inits: tuple[str, ...]
    init_hint: str = ""
    whole_factors: bool = False
    engine_hint: str = ""
    bf16: bool = True
    dtype_hint: str = ""
    prepare: Callable[..., Any] | None = None
    health: bool = False
    full_finetune: bool = False
    orthogonal: bool = False
    state_per_value: float = 2.0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout must be one of {LAYOUTS}, but got "
                             f"{self.layout!r}")
        unknown = set(self.inits) - set(INIT_METHODS)
        if unknown:
            raise ValueError(f"{self.name}: inits must be among {INIT_METHODS}, but got "
                             f"{sorted(unknown)}")

    def options(self) -> tuple[str, ...]:
        """Names ``optimizer.options`` may set: the builder's keyword parameters that no recipe
        key sets."""
        params = inspect.signature(self.build).parameters
        return tuple(p for p in params if p not in _NOT_OPTIONS and p not in self.recipe_keys
                     and params[p].kind in (inspect.Parameter.KEYWORD_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD))


_MANIFOLD = dict(layout="manifold", inits=_MANIFOLD_INITS, init_hint="needs the manifold layout",
                 health=True, state_per_value=0.5)
_WHOLE_FACTORS = dict(
    whole_factors=True,
    engine_hint="needs the model's 2-D LoRA weights and their grads, which ZeRO-1/2/3 and FSDP2 "
                "flatten or shard")

OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("riemannion", Riemannion,
                  ("lr", "momentum", "weight_decay"), **_MANIFOLD),
    OptimizerSpec("riemann_sgd", RiemannSGD,
                  ("lr", "momentum", "weight_decay"), **_MANIFOLD),
    OptimizerSpec("riemann_adam", RiemannAdam,
                  ("lr", "betas", "eps", "weight_decay"), **_MANIFOLD),
    OptimizerSpec("adamw", adamw_lora,
                  ("lr", "weight_decay", "betas", "eps"), layout="peft", inits=_PEFT_INITS,
                  full_finetune=True, orthogonal=True),
    OptimizerSpec("muon", muon_lora,
                  ("lr", "weight_decay", "momentum", "betas", "eps"), layout="peft",
                  inits=_PEFT_INITS, state_per_value=1.0, **_WHOLE_FACTORS),
    OptimizerSpec("rprec_adamw", rprec_adamw,
                  ("lr", "weight_decay", "betas", "eps", "reg"), layout="peft",
                  inits=_PEFT_INITS, bf16=False, **_WHOLE_FACTORS,
                  dtype_hint="preconditions the model's own LoRA grads, which DeepSpeed's bf16 "
                             "wrapper replaces by fp32 master copies"),
    OptimizerSpec("stella", StelLA,
                  ("lr", "betas", "eps", "weight_decay"), layout="peft", inits=("peft",),
                  init_hint="starts from its own orthonormal U S Vᵀ", **_WHOLE_FACTORS,
                  prepare=stella_init, health=True, state_per_value=3.0, bf16=False,
                  dtype_hint="updates the model's LoRA factors in place, which DeepSpeed's bf16 "
                             "wrapper (ZeRO-0, its only stage) overwrites with its own fp32 "
                             "copies every step"),
    # Muon for tensors of any order: per-factor Muon on LoRA, or whole tensors (MoE expert stacks)
    # under model.trainable.
    OptimizerSpec("tensorion", tensorion_model,
                  ("lr", "momentum", "weight_decay"), layout="peft", inits=_PEFT_INITS,
                  bf16=False, dtype_hint="is not yet tested under DeepSpeed's bf16 wrapper",
                  full_finetune=True,
                  state_per_value=1.0),
)}


def spec(name: str) -> OptimizerSpec:
    """The row of optimizer ``name`` (recipe validation has checked that it exists)."""
    return OPTIMIZERS[name]


def init_error(name: str, init: str) -> str | None:
    """Why ``init.method=init`` does not suit ``optimizer.name=name`` (None if it does)."""
    row = OPTIMIZERS[name]
    if init in row.inits:
        return None
    valid = ", ".join(row.inits)
    if row.init_hint:
        return f"optimizer {name!r} {row.init_hint}; set init.method to one of {valid} (got {init})"
    users = [s.name for s in OPTIMIZERS.values() if init in s.inits]
    kind = "a manifold" if all(OPTIMIZERS[u].layout == "manifold" for u in users) else "another"
    return (f"init.method={init} needs {kind} optimizer ({', '.join(users)}), but optimizer.name "
            f"is {name!r}; set init.method to one of {valid}")


def adapter_error(name: str, adapter_type: str, init: str) -> str | None:
    """Why ``optimizer.name=name`` with ``init.method=init`` cannot train ``adapter.type``
    (None if it can): orthogonal adapters train with the rows marked ``orthogonal`` and PEFT's
    own initialisation."""
    if adapter_type == "lora":
        return None
    rows = [s.name for s in OPTIMIZERS.values() if s.orthogonal]
    if name in rows and init == "peft":
        return None
    return (f"adapter.type={adapter_type} trains with optimizer.name in {rows} and "
            f"init.method=peft, but got {name!r} and {init!r}; set those two keys")


def engine_error(name: str, *, where: str, whole: bool, copies_back: bool, bf16: bool
                 ) -> str | None:
    """Why optimizer ``name`` cannot run on an engine (None if it can).

    The engine describes itself, so no engine name is compared here: ``where`` names it for the
    message ("ZeRO-2", "FSDP2"), ``whole`` says whether it leaves the model's parameters whole
    and stepped in place, ``copies_back`` whether its mixed-precision wrapper copies its own
    master weights over the model after every step (DeepSpeed's ZeRO-0 bf16 wrapper), ``bf16``
    whether the run is in bf16.
    """
    row = OPTIMIZERS[name]
    if row.whole_factors and not whole:
        return (f"optimizer {name!r} {row.engine_hint or 'does not run there'} ({where}; it runs "
                f"on deepspeed stage 0); use engine=deepspeed with "
                f"deepspeed.zero_optimization.stage=0")
    if bf16 and not row.bf16:
        return f"optimizer {name!r} {row.dtype_hint}; set deepspeed.bf16.enabled=false"
    if copies_back and row.layout == "manifold":
        # The wrapper hands the optimizer fp32 copies of the params and copies them back over the
        # model after the step: a manifold optimizer, which steps the adapters themselves, would
        # train nothing (and LOI would be undone at step 1).
        return (f"optimizer {name!r} with bf16 needs ZeRO-1, 2 or 3 (DeepSpeed's ZeRO-0 bf16 "
                f"wrapper would overwrite its updates every step); set "
                f"deepspeed.zero_optimization.stage=1 (on one process it shards nothing) or "
                f"deepspeed.bf16.enabled=false")
    return None
