"""Atomic, verified, resumable training checkpoints.

The engine-independent part; each engine writes and reads its own files
(:meth:`~riemann_zero.train.engines.base.Engine.io`).

Layout: ``OUTPUT_DIR/checkpoints/step-00000042/`` holds the engine's own files (trainable
parameters, buffers, optimizer, LR scheduler; frozen base weights are rebuilt, not stored), one
``trainer_state_rank{R}.pt`` per rank (step, data-loader position, RNG states of Python, NumPy and
torch) and, written last, ``COMPLETE``: the step and every file with its size and SHA-256. A
checkpoint is built in ``checkpoints/.tmp/`` and renamed into place after every file has been
fsync'ed, so a run killed mid-save leaves either the previous checkpoint set or the new one, never
half of one; a save that fails (a full disk) removes its staging folder and says why.
``resume=auto`` takes the newest checkpoint whose files match ``COMPLETE`` and says which newer
ones it skipped and why.

Multi-node runs need ``output_dir`` on a shared file system (as DeepSpeed itself assumes).
"""

from __future__ import annotations

import contextlib
import errno
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

from riemann_zero.io import fsync_dir, fsync_tree, sha256_file, write_text_atomically

__all__ = [
    "COMPLETE",
    "CheckpointError",
    "rng_state",
    "set_rng_state",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "checkpoint_bytes",
    "verify_checkpoint",
    "resume_point",
    "save_checkpoint",
    "load_trainer_state",
]

COMPLETE = "COMPLETE"
STAGING = ".tmp"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_MIB = 2**20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the fix."""


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


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "sha256": digest}}`` of every file under ``directory``."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != COMPLETE)
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files}


def _marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_bytes(path: str | Path) -> int:
    """Total size of a checkpoint's files as recorded in its ``COMPLETE`` (0 if unknown)."""
    marker = _marker(Path(path)) or {}
    return sum(int(f["bytes"]) for f in marker.get("files", {}).values())


def verify_checkpoint(path: str | Path, *, checksums: bool = True) -> str | None:
    """What is wrong with a checkpoint's files (None when they match ``COMPLETE``).

    Sizes are always compared; SHA-256 digests too when ``checksums``. A ``COMPLETE`` without a
    file list (written before files were recorded) is accepted as it is.
    """
    path = Path(path)
    marker = _marker(path)
    if marker is None:
        return f"{path / COMPLETE} is missing or unreadable"
    for rel, want in marker.get("files", {}).items():
        file = path / rel
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{file} has {size} bytes, {COMPLETE} recorded {want['bytes']} (truncated?)"
        if checksums and sha256_file(file) != want["sha256"]:
            return f"{file} does not match its SHA-256 recorded in {COMPLETE} (damaged)"
    return None


def resume_point(root: str | Path, *, checksums: bool = True) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` whose files verify, and one line for each
    newer checkpoint skipped because it is damaged.

    Raises:
        CheckpointError: there are complete checkpoints but every one is damaged.
    """
    found = list_checkpoints(root)
    skipped = []
    for path in reversed(found):
        problem = verify_checkpoint(path, checksums=checksums)
        if problem is None:
            return path, skipped
        skipped.append(f"skipping damaged checkpoint {path.name}: {problem}")
    if found:
        raise CheckpointError(
            f"every checkpoint under {root} is damaged ({'; '.join(skipped)}); restore those "
            f"files, or delete the output_dir to start over")
    return None, skipped


def _no_space(err: BaseException) -> bool:
    """Did writing fail for lack of space? (torch.save reports ENOSPC as C++ stream errors.)"""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if any(s in str(seen) for s in ("No space left", "iostream error", "unexpected pos")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _check_free_space(root: Path, need: int, name: str) -> None:
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(
            f"not enough free space for checkpoint {name} in {root}: it needs about "
            f"{need / _MIB:.1f} MiB and {free / _MIB:.1f} MiB are free; free some space, lower "
            f"train.keep_last, or set output_dir on a larger disk (earlier checkpoints are intact)")


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    write_engine_state: Callable[[Path], None],
    trainer_state: dict[str, Any],
    rank: int,
    barrier: Callable[[], None],
    keep_last: int = 2,
    expected_bytes: int = 0,
) -> Path:
    """Write one checkpoint atomically; every rank calls this.

    Only states that passed the loop's finiteness check are saved, so rotation (``keep_last``)
    never removes the newest finite checkpoint.

    Args:
        root: the checkpoints directory.
        step: the optimizer step just completed.
        write_engine_state: writes model/optimizer/scheduler state into the directory it is given
            (collective; the writer of the engine's ``io``).
        trainer_state: this rank's loop state (step, data position, ...); RNG states are added.
        rank: this process's global rank (rank 0 finalises).
        barrier: a collective barrier (identity for one process).
        keep_last: complete checkpoints to keep; older ones are deleted after the rename.
        expected_bytes: the checkpoint's expected size; every rank checks the free space of
            ``root`` against it (with 10 % and 16 MiB to spare) before anything is written.

    Raises:
        CheckpointError: not enough space before the save, or the save failed (the message says
            whether the disk is full); the staging folder is removed and earlier checkpoints stay.

    Returns:
        The final checkpoint directory.
    """
    root = Path(root)
    final = checkpoint_path(root, step)
    staging = root / STAGING / final.name
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a save that was killed earlier
        staging.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    need = int(expected_bytes * 1.1) + 16 * _MIB
    try:
        _check_free_space(root, need, final.name)
        write_engine_state(staging)
        staging.mkdir(parents=True, exist_ok=True)
        torch.save({**trainer_state, "rng": rng_state()}, staging / f"trainer_state_rank{rank}.pt")
        barrier()
        if rank == 0:
            fsync_tree(staging)
            marker = {"step": step, "finite": True, "files": _manifest(staging)}
            write_text_atomically(staging / COMPLETE, json.dumps(marker, indent=1) + "\n")
            fsync_tree(staging)
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_dir(root)
    except Exception as err:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(root / STAGING)
        if isinstance(err, CheckpointError):
            raise
        if _no_space(err):
            free = shutil.disk_usage(root).free
            raise CheckpointError(
                f"no space left on the device while writing checkpoint {final.name} to {root} "
                f"(about {need / _MIB:.1f} MiB needed, {free / _MIB:.1f} MiB free now); free some "
                f"space or set output_dir on a larger disk; the staging folder was removed and "
                f"earlier checkpoints are intact") from err
        raise CheckpointError(f"writing checkpoint {final.name} to {root} failed: "
                              f"{type(err).__name__}: {err}") from err
    if rank == 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        _remove_empty(root / STAGING)
    barrier()
    return final


def _remove_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another rank's files) or already gone
        directory.rmdir()


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
    try:
        return torch.load(file, weights_only=False)  # our own file: RNG states are NumPy tuples
    except Exception as err:
        raise CheckpointError(f"{file} cannot be read ({type(err).__name__}: {err}); resume=auto "
                              f"verifies every file and falls back to the newest intact "
                              f"checkpoint") from err
