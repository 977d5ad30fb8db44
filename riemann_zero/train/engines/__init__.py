"""The engines of the driver, one class per engine kind (:mod:`.base` says what each provides):

- :class:`~.deepspeed.DeepSpeedEngine`: ``deepspeed.initialize``, any ZeRO stage, from the
  recipe's ``deepspeed:`` block;
- :class:`~.fsdp2.FSDP2Engine`: ``fully_shard`` per decoder layer (started by torchrun).

:func:`engine_for` is the one place a recipe's ``engine`` value is looked up; nothing else in the
driver compares engine names. :mod:`.loading` holds the three ways of creating the base model.
"""

from __future__ import annotations

from riemann_zero.train.engines.base import Description, Engine, MemoryFacts
from riemann_zero.train.engines.deepspeed import DeepSpeedEngine
from riemann_zero.train.engines.fsdp2 import FSDP2Engine
from riemann_zero.train.recipe import ENGINES, Recipe

__all__ = ["ENGINE_CLASSES", "engine_for", "Engine", "Description", "MemoryFacts",
           "DeepSpeedEngine", "FSDP2Engine"]

# The recipe's ``engine`` value -> its class (the names are those of recipe.ENGINES).
ENGINE_CLASSES: dict[str, type[Engine]] = {"deepspeed": DeepSpeedEngine, "fsdp2": FSDP2Engine}


def engine_for(recipe: Recipe) -> Engine:
    """The engine the recipe names, for this run (nothing is started yet)."""
    if recipe.engine not in ENGINE_CLASSES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, but got {recipe.engine!r}")
    return ENGINE_CLASSES[recipe.engine](recipe)
