"""Checkpoints are atomic, pruned, found by resume=auto, and restore every RNG stream."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from riemann_zero.train import checkpoint as ckpt


def _save(root, step, *, keep_last=2, fail=False):
    def write(directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.bin").write_bytes(bytes([step % 256]) * 16)
        if fail:
            raise RuntimeError("killed mid-save")

    return ckpt.save_checkpoint(root, step, write_engine_state=write,
                                trainer_state={"step": step, "micro_batches": 2 * step}, rank=0,
                                barrier=lambda: None, keep_last=keep_last)


def test_latest_complete_checkpoint_and_pruning(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (3, 6, 9):
        _save(tmp_path, step)
    kept = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert kept == ["step-00000006", "step-00000009"]  # keep_last=2
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000009"
    state = ckpt.load_trainer_state(latest, rank=0)
    assert state["step"] == 9 and state["micro_batches"] == 18


def test_crash_during_save_leaves_previous_checkpoint(tmp_path):
    _save(tmp_path, 3)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        _save(tmp_path, 6, fail=True)
    # the half-written step 6 is removed with its staging folder and never picked up
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    assert not (tmp_path / "step-00000006").exists() and not (tmp_path / ".tmp").exists()
    _save(tmp_path, 6)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000006"


def test_killed_save_leaves_staging_that_the_next_save_clears(tmp_path):
    _save(tmp_path, 3)
    stale = tmp_path / ".tmp" / "step-00000006"  # what kill -9 mid-save leaves
    stale.mkdir(parents=True)
    (stale / "model.bin").write_bytes(b"half")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    _save(tmp_path, 6)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000006"
    assert (tmp_path / "step-00000006" / "model.bin").read_bytes() == bytes([6]) * 16
    assert not (tmp_path / ".tmp").exists()


def test_directory_without_marker_is_ignored(tmp_path):
    _save(tmp_path, 3)
    (tmp_path / "step-00000004").mkdir()  # e.g. copied by hand, incomplete
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_trainer_state(tmp_path / "step-00000004", rank=0)


def test_missing_rank_state_names_the_world_size(tmp_path):
    path = _save(tmp_path, 3)
    with pytest.raises(ValueError, match="no state for rank 1"):
        ckpt.load_trainer_state(path, rank=1)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # advance every stream
    ckpt.set_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
