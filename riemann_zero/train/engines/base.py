"""What every engine of the driver provides; one subclass per engine kind.

An engine is chosen once from the recipe (:func:`~riemann_zero.train.engines.engine_for`). Before
any process group exists it describes itself to the checks: where it runs
(:meth:`Engine.describe`, what :func:`riemann_zero.optim.registry.engine_error` reads), how the
base model is created (:meth:`Engine.load`), its own config checks (:meth:`Engine.check`) and what
it keeps per rank (:meth:`Engine.memory_facts`, :meth:`Engine.gathered_values`,
:meth:`Engine.gradient_bytes`). Then it starts the process group
(:meth:`Engine.init_distributed`), wraps the model and takes its optimizer from a factory
(:meth:`Engine.start`), and from there behaves like the model: forward (``__call__``),
``backward``, ``step`` at every micro-batch (optimizer and scheduler at accumulation boundaries
only), ``train``, ``lr``, ``grad_norm`` and ``io`` (checkpoint writer and reader).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from riemann_zero.adapters.inits import PEFT_INITS
from riemann_zero.optim import registry
from riemann_zero.optim.base import ManifoldOptimizer
from riemann_zero.train.engines.loading import WHOLE, Load
from riemann_zero.train.recipe import Recipe

__all__ = ["Engine", "Description", "MemoryFacts", "OptimizerFactory", "StateIO",
           "manifold_state"]

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]
StateIO = tuple[Callable[[Path], None], Callable[[Path], None]]  # (write, read) of a folder


@dataclass(frozen=True)
class Description:
    """What :func:`~riemann_zero.optim.registry.engine_error` needs to know about an engine.

    Attributes:
        where: its name in messages ("ZeRO-2", "FSDP2").
        whole: it leaves the model's parameters whole and stepped in place.
        copies_back: its mixed-precision wrapper copies its own master weights over the model
            after every step (DeepSpeed's ZeRO-0 bf16 wrapper).
    """

    where: str
    whole: bool
    copies_back: bool


@dataclass(frozen=True)
class MemoryFacts:
    """What an engine keeps per rank, for :func:`~riemann_zero.train.memory.estimate_memory`.

    Attributes:
        partitions_base: each rank holds ``1/world`` of the base (and of the adapters).
        shards_state: the optimizer state (and fp32 master) is split over the ranks.
        master_copy: it keeps an fp32 master of the trainable values even in fp32.
        offload_optimizer, offload_param: optimizer state / partitioned base in host memory.
    """

    partitions_base: bool
    shards_state: bool
    master_copy: bool
    offload_optimizer: bool = False
    offload_param: bool = False


def manifold_state(optimizer: Any) -> bool:
    """Whether ``optimizer`` keeps its own state keyed by adapter or tensor name
    (:meth:`~riemann_zero.optim.base.ManifoldOptimizer.named_state_dict`: momentum factors and
    masters), which ``torch.optim``'s ``state``/``param_groups`` do not hold."""
    return isinstance(optimizer, ManifoldOptimizer)


class Engine(abc.ABC):
    """One engine kind, for one run of ``recipe``; see the module docstring for its life."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.module: torch.nn.Module | None = None
        self.optimizer: Any = None  # what the engine steps
        self.client_optimizer: Any = None  # the recipe's optimizer, as built by the factory
        self.scheduler: Any = None
        self.device: torch.device | None = None

    # ------------------------------------------------------------------- self-description
    @classmethod
    @abc.abstractmethod
    def describe(cls, config: dict[str, Any], *, bf16: bool) -> Description:
        """Where this engine runs, given the recipe's ``deepspeed:`` block (or a Trainer's
        DeepSpeed config) and whether the run is in bf16."""

    @classmethod
    def optimizer_error(cls, name: str, config: dict[str, Any], *, bf16: bool) -> str | None:
        """Why optimizer ``name`` cannot run on this engine with ``config`` (None if it can)."""
        d = cls.describe(config, bf16=bf16)
        return registry.engine_error(name, where=d.where, whole=d.whole,
                                     copies_back=d.copies_back, bf16=bf16)

    def where(self) -> str:
        """The engine's name in messages ("ZeRO-2", "FSDP2")."""
        return self.describe(self.recipe.deepspeed, bf16=False).where

    def partitioned_load(self) -> Load:
        """How this engine creates the base when the start allows a partitioned load."""
        return WHOLE

    def load(self, trainable: dict[str, Any]) -> Load:
        """How this run creates its base model. Whole where the start needs the whole base
        weight (PiSSA, LoRA-GA, a row's ``prepare`` such as StelLA's, PEFT's OFT/BOFT, full
        fine-tuning) or with ``model.partitioned_load: false``; else the engine's own."""
        rc = self.recipe
        if not rc.model.partitioned_load:
            return WHOLE
        if trainable or rc.adapter.type != "lora" or rc.init.method in PEFT_INITS:
            return WHOLE
        if registry.spec(rc.optimizer.name).prepare is not None:
            return WHOLE
        return self.partitioned_load()

    def check(self, config: dict[str, Any]) -> None:  # noqa: B027 (an optional hook)
        """The engine's own checks of its complete config (RecipeError naming the key)."""

    @abc.abstractmethod
    def memory_facts(self) -> MemoryFacts:
        """What the memory estimate needs to know of this engine (sharding, master copies,
        offload)."""

    @abc.abstractmethod
    def gathered_values(self, counts: dict[str, int]) -> int:
        """Base values one rank makes whole at once while computing, from the meta-device
        counts of the model (``layer``, ``embed``, ``head``, ``root``)."""

    @abc.abstractmethod
    def gradient_bytes(self, n_train: int, width: int, world: int) -> int:
        """Bytes of gradients one rank holds for ``n_train`` trainable values of ``width``
        bytes each."""

    # ----------------------------------------------------------------------------- setup
    @abc.abstractmethod
    def init_distributed(self, backend: str) -> None:
        """Start the default process group on ``backend`` (gloo or nccl)."""

    def prepare_full_finetune(self, base: torch.nn.Module) -> None:  # noqa: B027 (optional)
        """What full fine-tuning of some parameters needs from the base model, if anything."""

    @abc.abstractmethod
    def start(self, model: torch.nn.Module, make_optimizer: OptimizerFactory,
              lr_fn: Callable[[int], float], *, config: dict[str, Any], grad_accum: int,
              device: torch.device) -> None:
        """Wrap ``model``, build its optimizer with ``make_optimizer(model)`` and a LambdaLR of
        ``lr_fn`` on it. ``config``: the complete DeepSpeed config (batch layout, clipping)."""

    # ------------------------------------------------------------------------- training
    @abc.abstractmethod
    def __call__(self, **batch):
        """The wrapped model's forward on one micro-batch."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (scaled for gradient accumulation as the engine
        does it)."""

    @abc.abstractmethod
    def step(self) -> None:
        """Called after every micro-batch: the optimizer and scheduler step at accumulation
        boundaries only."""

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def lr(self) -> float:
        return float(self.client_optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last optimizer step (None where none was taken)."""
        return None

    # ----------------------------------------------------------------------------- state
    @abc.abstractmethod
    def io(self, exclude_frozen: bool) -> StateIO:
        """Writer and reader of the engine's state (trainable model state incl. buffers,
        optimizer, scheduler) in a checkpoint folder; both collective. ``exclude_frozen``:
        leave frozen base weights out (the driver rebuilds them identically before loading)."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on CPU, where reading the module's own needs the engine
        (None: the module's own parameters, made whole by ``gathered``)."""
        return None
