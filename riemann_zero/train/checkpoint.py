"""Atomic, resumable training checkpoints.

Layout: ``OUTPUT_DIR/checkpoints/step-00000042/`` holds the engine's own files (model state with
buffers, optimizer, LR scheduler), one ``trainer_state_rank{R}.pt`` per rank (step, data-loader
position, RNG states of Python, NumPy and torch) and, written last, ``COMPLETE``. A checkpoint is
built in ``checkpoints/.tmp/`` and renamed into place after every file has been fsync'ed, so a
run killed mid-save leaves either the previous checkpoint set or the new one, never half of one.
``resume=auto`` takes the newest directory that has ``COMPLETE``.

Multi-node runs need ``output_dir`` on a shared file system (as DeepSpeed itself assumes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from riemann_zero.io import fsync_dir, fsync_tree

__all__ = [
    "COMPLETE",
    "rng_state",
    "set_rng_state",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_trainer_state",
    "deepspeed_io",
]

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    """RNG states of every library the loop draws from (dropout, shuffling)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(root: str | Path, step: int) -> Path:
    """``root/step-NNNNNNNN`` (zero-padded so names sort by step)."""
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    write_engine_state: Callable[[Path], None],
    trainer_state: dict[str, Any],
    rank: int,
    barrier: Callable[[], None],
    keep_last: int = 2,
) -> Path:
    """Write one checkpoint atomically; every rank calls this.

    Args:
        root: the checkpoints directory.
        step: the optimizer step just completed.
        write_engine_state: writes model/optimizer/scheduler state into the directory it is given
            (collective; e.g. :func:`deepspeed_io`'s writer).
        trainer_state: this rank's loop state (step, data position, ...); RNG states are added.
        rank: this process's global rank (rank 0 finalises).
        barrier: a collective barrier (identity for one process).
        keep_last: complete checkpoints to keep; older ones are deleted after the rename.

    Returns:
        The final checkpoint directory.
    """
    root = Path(root)
    final = checkpoint_path(root, step)
    staging = root / ".tmp" / final.name
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a save that crashed earlier
        staging.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    write_engine_state(staging)
    staging.mkdir(parents=True, exist_ok=True)
    torch.save({**trainer_state, "rng": rng_state()}, staging / f"trainer_state_rank{rank}.pt")
    barrier()
    if rank == 0:
        fsync_tree(staging)
        marker = staging / COMPLETE
        marker.write_text(json.dumps({"step": step}) + "\n")
        fsync_tree(staging)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_trainer_state(path: str | Path, rank: int) -> dict[str, Any]:
    """This rank's loop state from a checkpoint (RNG states are restored by the caller)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE} file); pass "
                         f"resume=auto to pick the newest complete one")
    file = path / f"trainer_state_rank{rank}.pt"
    if not file.is_file():
        saved = sorted(p.name for p in path.glob("trainer_state_rank*.pt"))
        raise ValueError(f"{path} has no state for rank {rank} (it holds {saved}); resume with "
                         f"the world size the checkpoint was written with")
    return torch.load(file, weights_only=False)  # our own file: RNG states are NumPy tuples


def deepspeed_io(engine: Any, *, exclude_frozen: bool) -> tuple[Callable[[Path], None],
                                                               Callable[[Path], None]]:
    """Writer and reader of a DeepSpeed engine's state (model incl. buffers, optimizer, scheduler).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine``.
        exclude_frozen: leave frozen base weights out of the files. Only valid when the driver
            rebuilds them identically before loading (it re-runs the deterministic
            initialisation, LOI's base-weight shift included); buffers are always saved.
    """

    def write(directory: Path) -> None:
        engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)

    def read(directory: Path) -> None:
        load_path, _ = engine.load_checkpoint(
            str(directory.parent), tag=directory.name, load_module_strict=not exclude_frozen,
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    return write, read
