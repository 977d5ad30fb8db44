"""One run per ``output_dir``: a lock file held for the run's whole life by all ranks of one job.

Rank 0 creates ``OUTPUT_DIR/run.lock`` exclusively (``O_CREAT | O_EXCL``) with its pid, host, start
time and the job's token (``MASTER_ADDR``, ``MASTER_PORT`` and the launcher's run id, plus the host
when the master address is a loopback one: every rank of one launch shares them, on every node,
and two live launches cannot); the other ranks wait until the lock carries their token. A
second job gets one line naming the holder. A lock whose process is gone (same host, pid not
alive, e.g. after ``kill -9``) is reported and taken over; one from another host is reported
with the way to remove it, since its process cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from riemann_zero.train.parsing import RecipeError

__all__ = ["RunLock", "job_token", "LOCK_NAME"]

LOCK_NAME = "run.lock"


def job_token() -> str:
    """What every rank of this launch shares, on every node, and no other live launch has.

    The master's address and port (and torchrun's run id) identify a launch across its nodes;
    ranks on other nodes have other host names, so the host enters only when the master address
    is a loopback one (then every rank is on this host, and two hosts may both use 127.0.0.1)."""
    addr = os.environ.get("MASTER_ADDR", "")
    loopback = addr in ("", "localhost", "::1") or addr.startswith("127.")
    return ":".join([socket.gethostname() if loopback else "", addr,
                     os.environ.get("MASTER_PORT", ""), os.environ.get("TORCHELASTIC_RUN_ID", "")])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(out, rank):`` holds ``out/run.lock`` (rank 0 writes it, the others check it).

    Args:
        out: the run's ``output_dir`` (created if missing).
        rank: this process's global rank.
        wait_s: how long ranks other than 0 wait for rank 0 to take the lock.

    Raises:
        RecipeError: another live run holds the lock (one line: holder pid, host, start time).
    """

    def __init__(self, out: str | os.PathLike, rank: int, *, wait_s: float = 600.0) -> None:
        self.out, self.rank, self.wait_s = Path(out), rank, wait_s
        self.path = self.out / LOCK_NAME
        self.token = job_token()
        self.created_dir = False
        self.notes: list[str] = []

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written by its creator this very moment
            time.sleep(0.1)
            try:
                return json.loads(self.path.read_text())
            except (OSError, ValueError):
                return {}

    def _busy(self, holder: dict) -> RecipeError:
        return RecipeError(
            f"output_dir {str(self.out)!r} is in use by another run (pid {holder.get('pid')} on "
            f"host {holder.get('host')}, started {holder.get('started')}); wait for it to finish "
            f"or choose another output_dir (if that run is gone, delete {self.path})")

    def _take(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)
        return True

    def _acquire_rank0(self) -> None:
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self.created_dir = True
        while not self._take():
            holder = self._read()
            if holder is None:
                continue  # released between our two calls
            if holder.get("token") == self.token:
                return
            same_host = holder.get("host") == socket.gethostname()
            if not (same_host and isinstance(holder.get("pid"), int)
                    and not _alive(holder["pid"])):
                raise self._busy(holder)
            self.notes.append(f"removed a stale lock of pid {holder['pid']} on host "
                              f"{holder['host']} (started {holder.get('started')}; that process "
                              f"is gone)")
            self.path.unlink(missing_ok=True)

    def acquire(self) -> RunLock:
        if self.rank == 0:
            try:
                self._acquire_rank0()
            except OSError as err:  # no permission, read-only file system, a file in the way
                raise RecipeError(f"output_dir {str(self.out)!r} cannot be written "
                                  f"({err.strerror or err}); choose a writable output_dir"
                                  ) from None
            return self
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            holder = self._read()
            if holder and holder.get("token") == self.token:
                return self
            time.sleep(0.2)
        raise RecipeError(f"rank {self.rank}: rank 0 did not take the lock {self.path} within "
                          f"{self.wait_s:.0f} s; is output_dir on a file system all ranks share?")

    def release(self) -> None:
        """Rank 0 removes the lock if it is still ours (and the folder, if we made it and it
        stayed empty)."""
        if self.rank != 0:
            return
        holder = self._read()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            with contextlib.suppress(OSError):  # it holds the run's files
                self.out.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
