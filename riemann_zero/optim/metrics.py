"""The metric names an optimizer's step is logged under, built in one place for the recipe driver
(``metrics.jsonl``) and the Hugging Face Trainer (``Trainer.log``).

- ``manifold/<name>``: the manifold health of the optimizer's own (possibly sharded) factors
  (``orth_err_U`` …, :func:`~riemann_zero.optim.base.manifold_health`; a collective);
- ``comm/<collective>.<what>``: the bytes this rank handed to each collective in the last step
  (``all_reduce.gram_m`` …, the keys of ``last_step_comm``; empty on one process).
"""

from __future__ import annotations

from typing import Any

from riemann_zero.optim.base import manifold_health

__all__ = ["step_metrics"]


def step_metrics(optimizer: Any, *, health: bool = True) -> dict[str, float | int]:
    """``{"manifold/…": float, "comm/…": int}`` of ``optimizer``'s last step.

    Args:
        optimizer: the optimizer as built (not an engine's wrapper of it).
        health: include the manifold health (a collective: every rank must ask on the same
            steps); False for optimizers without manifold factors.
    """
    metrics: dict[str, float | int] = {}
    if health:
        metrics.update({f"manifold/{k}": float(v) for k, v in manifold_health(optimizer).items()})
    comm = getattr(optimizer, "last_step_comm", {})
    metrics.update({f"comm/{k}": int(v) for k, v in comm.items()})
    return metrics
