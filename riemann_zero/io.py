"""Atomic file and folder writes, JSON, and what a run record says about its software (and the
process's peak memory).

Every file or folder this package leaves behind is written under a temporary name and renamed
into place, so a crash or a kill leaves the previous version (or nothing), never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "write_text_atomically",
    "write_bytes_atomically",
    "write_json",
    "write_dir_atomically",
    "default_mode",
    "fsync_tree",
    "sha256_file",
    "fsync_dir",
    "versions",
    "git_commit",
    "peak_rss_mib",
    "RUN_PACKAGES",
]

# The packages whose versions decide what a training run computes.
RUN_PACKAGES = ("torch", "transformers", "peft", "deepspeed", "riemann-zero")


def default_mode(*, directory: bool) -> int:
    """The mode ``open``/``mkdir`` would give under the current umask (0644/0755 by default).

    ``tempfile`` creates its files 0600 and folders 0700; whatever is renamed into place gets this
    mode instead, so a serving process running as another user can read adapters and checkpoints.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _umask_modes(root: Path) -> None:
    """Give a built folder and everything in it the umask's modes (some writers, like
    ``tempfile`` or safetensors, create 0600/0700 entries)."""
    root.chmod(default_mode(directory=True))
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), default_mode(directory=True))
        for name in files:
            os.chmod(os.path.join(dirpath, name), default_mode(directory=False))


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    os.fchmod(fd, default_mode(directory=False))
    os.close(fd)
    return Path(name)


def write_bytes_atomically(path: str | os.PathLike, chunks: Iterable[bytes] | bytes) -> Path:
    """Write ``chunks`` (bytes, or an iterable of blocks) to a temporary sibling, then rename."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            for block in [chunks] if isinstance(chunks, bytes) else chunks:
                fh.write(block)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and a rename."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2,
               sort_keys: bool = False) -> Path:
    """Write JSON atomically (non-JSON values such as paths are written as strings)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=str, ensure_ascii=False)
    return write_text_atomically(path, text + "\n")


def write_dir_atomically(out: str | os.PathLike, build: Callable[[Path], None], *,
                         replace: bool = True) -> Path:
    """``build(tmp)`` fills a temporary sibling folder, which then becomes ``out``.

    ``replace=True``: an existing ``out`` is replaced; a crash leaves the previous ``out`` (or,
    between the two renames, ``out.old``) intact, never a half-written folder under the final
    name. ``replace=False`` (caches): an existing ``out`` is kept and ``build`` not called; if
    another process renames its own copy into place first, theirs is kept.
    """
    out = Path(out)
    if not replace and out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        build(tmp)
        _umask_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            tmp.rename(out)
        except OSError:  # another process won the race; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under ``path`` to disk."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def versions(packages: Iterable[str] = RUN_PACKAGES, *, missing: str | None = None
             ) -> dict[str, str]:
    """Python's and the installed packages' versions (a package not installed is left out, or
    reported as ``missing`` when that is given)."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            if missing is not None:
                out[pkg] = missing
    return out


def git_commit(repo: str | os.PathLike) -> str | None:
    """The commit checked out in ``repo`` (None outside a git checkout)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    return None


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (``VmHWM`` of ``/proc/self/status``:
    anonymous plus file-backed pages, e.g. a memory-mapped checkpoint); None where there is no
    procfs (macOS, Windows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None
