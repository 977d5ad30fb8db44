"""What the user sees: one line when a long stage starts and one when it ends, with its
duration, on rank 0 only; and how much the libraries underneath may print.

``with stage("tokenising 2,000 examples"):`` prints ``[riemann_zero] tokenising 2,000 examples …``
and then ``[riemann_zero] tokenising 2,000 examples: 12.3 s``. The rank comes from the launcher's
``RANK`` (no process group is needed), so asset fetches in preflight and the eval stage use it
too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

__all__ = ["is_rank0", "say", "stage", "configure_logging", "LOG_LEVELS"]


def is_rank0() -> bool:
    """True on global rank 0 (or without a launcher)."""
    return os.environ.get("RANK", "0") == "0"


def say(msg: str, *, every_rank: bool = False) -> None:
    """A ``[riemann_zero]`` line on rank 0 (stderr stays for errors); ``every_rank``: on
    whichever rank runs it, named (work done once per node, such as filling the asset cache)."""
    if is_rank0():
        print(f"[riemann_zero] {msg}", file=sys.stdout, flush=True)
    elif every_rank:
        print(f"[riemann_zero] rank {os.environ.get('RANK')}: {msg}", file=sys.stdout, flush=True)


@contextlib.contextmanager
def stage(label: str, *, every_rank: bool = False) -> Iterator[None]:
    """Announce a stage, run it, and report how long it took (or that it failed)."""
    say(f"{label} …", every_rank=every_rank)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        say(f"{label}: failed after {time.perf_counter() - start:.1f} s", every_rank=every_rank)
        raise
    say(f"{label}: {time.perf_counter() - start:.1f} s", every_rank=every_rank)


class _Once(logging.Filter):
    """Let each distinct message through once, and drop lm-eval's note about custom kwargs (the
    eval stage passes its metadata already), so 32 tasks do not print 32 copies."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Custom kwargs can be passed" in message or message in self.seen:
            return False
        self.seen.add(message)
        return True


LOG_LEVELS = ("debug", "info", "warning")


def configure_logging(level: str = "info") -> None:
    """What the libraries print: ``debug`` everything, on every rank; ``info`` (default) DeepSpeed
    and transformers at INFO on rank 0 only, torch.distributed's INFO lines off, lm-eval's
    repeated lines once; ``warning`` only warnings and errors."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {list(LOG_LEVELS)}, but got {level!r}")
    if level == "debug":
        return
    quiet = logging.WARNING if level == "warning" or not is_rank0() else logging.INFO
    for name in ("DeepSpeed", "deepspeed", "transformers"):
        logging.getLogger(name).setLevel(max(quiet, logging.getLogger(name).level))
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)  # "Using device: None" …
    once = _Once()  # a logger's filters see only its own records: attach to each lm-eval one
    names = {"lm_eval.api.task", *(n for n in logging.root.manager.loggerDict
                                   if n.startswith("lm_eval"))}
    for name in sorted(names):
        log = logging.getLogger(name)
        if not any(isinstance(f, _Once) for f in log.filters):
            log.addFilter(once)
        if level == "warning":
            log.setLevel(logging.WARNING)
