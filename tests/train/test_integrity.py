"""Checkpoints record every file with its size and SHA-256; resume verifies them and falls back to
the newest intact one; a full disk gives one clear line and leaves no staging folder; folders are
written with the user's umask; one run per output_dir."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from riemann_zero.io import write_dir_atomically
from riemann_zero.train import checkpoint as ckpt
from riemann_zero.train.lock import LOCK_NAME, RunLock
from riemann_zero.train.parsing import RecipeError


def _save(root, step, *, payload=16, fail=None, expected_bytes=0, keep_last=3):
    def write(directory):
        directory.mkdir(parents=True, exist_ok=True)
        if fail is not None:
            raise fail
        torch.save(torch.full((payload,), float(step)), directory / "model.pt")

    return ckpt.save_checkpoint(root, step, write_engine_state=write,
                                trainer_state={"step": step}, rank=0, barrier=lambda: None,
                                keep_last=keep_last, expected_bytes=expected_bytes)


def test_complete_records_every_file_with_size_and_checksum(tmp_path):
    path = _save(tmp_path, 3)
    marker = json.loads((path / ckpt.COMPLETE).read_text())
    assert marker["step"] == 3 and marker["finite"] is True
    assert sorted(marker["files"]) == ["model.pt", "trainer_state_rank0.pt"]
    for rel, rec in marker["files"].items():
        assert rec["bytes"] == (path / rel).stat().st_size and len(rec["sha256"]) == 64
    assert ckpt.checkpoint_bytes(path) == sum(r["bytes"] for r in marker["files"].values())
    assert ckpt.verify_checkpoint(path) is None
    assert not (tmp_path / ckpt.STAGING).exists()  # no hidden staging folder left behind


def test_truncated_file_is_named_and_resume_falls_back(tmp_path):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    model = newest / "model.pt"
    model.write_bytes(model.read_bytes()[:-7])  # a torn write
    problem = ckpt.verify_checkpoint(newest)
    assert str(model) in problem and "truncated" in problem
    found, skipped = ckpt.resume_point(tmp_path)
    assert found.name == "step-00000002"
    assert len(skipped) == 1 and "step-00000004" in skipped[0] and "model.pt" in skipped[0]


def test_flipped_byte_is_caught_by_checksum_not_by_size(tmp_path):
    path = _save(tmp_path, 2)
    model = path / "model.pt"
    data = bytearray(model.read_bytes())
    data[-40] ^= 0xFF  # same size, different content
    model.write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(path, checksums=False) is None
    assert "SHA-256" in ckpt.verify_checkpoint(path, checksums=True)


def test_every_checkpoint_damaged_refuses_with_the_fix(tmp_path):
    path = _save(tmp_path, 2)
    (path / "model.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint .* is damaged.*model.pt "
                                                   "is missing.*delete the output_dir"):
        ckpt.resume_point(tmp_path)


def test_no_space_injected_gives_one_line_and_removes_staging(tmp_path):
    _save(tmp_path, 2)
    err = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(tmp_path, 4, fail=err)
    message = str(info.value)
    assert "\n" not in message and "no space left" in message and str(tmp_path) in message
    assert "larger disk" in message  # the fix
    assert not (tmp_path / ckpt.STAGING).exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002"]
    assert ckpt.verify_checkpoint(tmp_path / "step-00000002") is None


def test_free_space_is_checked_before_writing(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ckpt.CheckpointError, match=r"not enough free space .*needs about .*MiB"):
        _save(tmp_path, 2, expected_bytes=2 * free)
    assert not (tmp_path / ckpt.STAGING).exists() and not ckpt.list_checkpoints(tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 40 MiB tmpfs (needs mount rights; elsewhere the injected-ENOSPC test stands in)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; test_no_space_injected covers the same path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_really_full_disk(small_tmpfs):
    _save(small_tmpfs, 1, payload=1000)
    with pytest.raises(ckpt.CheckpointError, match="no space left") as info:
        # 48 MB of floats: passes the 16 MiB free-space check (no size expected), then fills it
        _save(small_tmpfs, 2, payload=12_000_000)
    assert "\n" not in str(info.value)
    assert not (small_tmpfs / ckpt.STAGING).exists()
    assert [p.name for p in ckpt.list_checkpoints(small_tmpfs)] == ["step-00000001"]


def test_written_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        def build(d: Path) -> None:
            (d / "sub").mkdir(mode=0o700)
            fd = os.open(d / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)

        out = write_dir_atomically(tmp_path / "adapter", build)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert ((out / "sub").stat().st_mode & 0o777) == 0o755
    assert ((out / "weights.bin").stat().st_mode & 0o777) == 0o644


def test_second_job_is_refused_with_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1111")
    first = RunLock(tmp_path / "run", rank=0).acquire()
    monkeypatch.setenv("MASTER_PORT", "2222")  # another launch
    with pytest.raises(RecipeError) as info:
        RunLock(tmp_path / "run", rank=0).acquire()
    message = str(info.value)
    assert "in use by another run" in message and f"pid {os.getpid()}" in message
    assert "\n" not in message
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock(tmp_path / "run", rank=0).acquire().release()  # free again


def test_other_ranks_of_the_same_job_share_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "3333")
    with RunLock(tmp_path / "run", rank=0), RunLock(tmp_path / "run", rank=1, wait_s=2):
        pass
    monkeypatch.setenv("MASTER_PORT", "4444")
    with RunLock(tmp_path / "run", rank=0), pytest.raises(RecipeError, match="rank 1"):
        monkeypatch.setenv("MASTER_PORT", "5555")
        RunLock(tmp_path / "run", rank=1, wait_s=0.5).acquire()


def test_ranks_on_another_node_share_the_lock(tmp_path, monkeypatch):
    """Regression: the job token held the host name, so on a real multi-node launch the ranks of
    the second node (another host name, same master) never recognised rank 0's lock and gave up
    after wait_s. With a routable master address the host is left out; with a loopback one
    (every rank on one host) it stays in, so two hosts that both use 127.0.0.1 do not clash."""
    import socket

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "7777")
    with RunLock(tmp_path / "run", rank=0):
        monkeypatch.setattr(socket, "gethostname", lambda: "node1")
        RunLock(tmp_path / "run", rank=2, wait_s=2).acquire()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(socket, "gethostname", lambda: "node0")
    with RunLock(tmp_path / "run", rank=0), pytest.raises(RecipeError, match="rank 2"):
        monkeypatch.setattr(socket, "gethostname", lambda: "node1")
        RunLock(tmp_path / "run", rank=2, wait_s=0.5).acquire()


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    import socket

    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "token": "gone", "started": "earlier"}))
    monkeypatch.setenv("MASTER_PORT", "6666")
    lock = RunLock(run, rank=0).acquire()
    assert len(lock.notes) == 1 and f"stale lock of pid {dead.pid}" in lock.notes[0]
    lock.release()


def test_lock_from_another_host_is_not_taken(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x",
                                             "started": "earlier"}))
    with pytest.raises(RecipeError, match=r"host elsewhere.*delete .*run.lock"):
        RunLock(run, rank=0).acquire()


def test_unwritable_output_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RecipeError, match="cannot be written .*choose a writable output_dir"):
        RunLock(blocker / "run", rank=0).acquire()
