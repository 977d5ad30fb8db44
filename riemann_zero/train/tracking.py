"""Mirrors of metrics.jsonl for experiment trackers (rank 0 only): TensorBoard event files under
``output_dir/tensorboard/`` (recipe ``logging.tensorboard``, on by default) and Weights & Biases
(``logging.wandb: true``, when installed). Every numeric field of a metrics record becomes a
scalar of the same name at the record's ``step``; a resumed run drops the events written after
its checkpoint, as it drops those lines of metrics.jsonl.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from riemann_zero.train.recipe import RecipeError

__all__ = ["Trackers", "scalars"]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite fields of a metrics record other than ``step`` (flags stay out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Trackers:
    """The trackers a recipe's ``logging`` section asks for; ``write(record)`` mirrors one
    metrics record, ``close()`` flushes. On ranks other than 0 it does nothing."""

    def __init__(self, cfg: Any, out: Path, *, rank: int, start: int = 0,
                 config: dict | None = None) -> None:
        self.tb = self.wandb = None
        if rank != 0:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RecipeError("logging.tensorboard=true needs tensorboard: pip install "
                                  "tensorboard, or set logging.tensorboard=false") from err
            self.tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"),
                                    purge_step=start + 1 if start else None)
        if cfg.wandb:
            try:
                import wandb
            except ImportError as err:
                raise RecipeError("logging.wandb=true needs wandb: pip install "
                                  "'riemann-zero[wandb]', or set logging.wandb=false") from err
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(out), config=config,
                                    mode=cfg.wandb_mode, resume="allow", id=_run_id(out))

    def write(self, record: dict[str, Any]) -> None:
        values, step = scalars(record), int(record.get("step", 0))
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()  # a handful of scalars per logged step: readable while it runs
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(out: Path) -> str:
    """A W&B run id stable per output_dir (a resumed run continues the same W&B run)."""
    import hashlib

    return hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:16]
