"""Telling a resume from a restart, from outside the driver.

Training is deterministic, so a run that ignored its checkpoint and started over would reproduce
the uninterrupted run's losses exactly; equal losses prove nothing. Two observations do:

- the forward passes of each process, logged by ``forward_probe/sitecustomize.py`` (the input ids
  of every token-embedding call): a resumed run repeats the start-up passes (LOI calibration),
  then runs exactly the uninterrupted run's micro-batches after the checkpoint, none before it;
- ``metrics.jsonl``: lines up to the checkpoint's step are kept from the first run (tagged here
  before resuming), lines after it are new; a restart rewrites the file from step 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROBE = Path(__file__).with_name("forward_probe")
TAG = "written_before_resume"


def probe_env(env: dict[str, str], log: Path) -> dict[str, str]:
    """``env`` with the forward probe on PYTHONPATH, logging to ``log.rank<R>``."""
    path = os.pathsep.join(p for p in (str(PROBE), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, "RZ_TEST_FORWARD_LOG": str(log)}


def training_forwards(log: Path, rank: int = 0) -> list[list]:
    """Input ids of the training-mode forward passes of ``rank``, in order."""
    path = Path(f"{log}.rank{rank}")
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r["ids"] for r in rows if r["train"]]


def tag_metrics(out: Path) -> None:
    """Mark every line of ``out/metrics.jsonl`` as written by the run before the resume."""
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, TAG: True}) + "\n" for r in rows))


def assert_resumed(full_log: Path, resumed_log: Path, out: Path, *, at: int, total: int,
                   micro_per_step: int, ranks: int = 1) -> None:
    """The run logged at ``resumed_log`` into ``out`` resumed at step ``at`` of ``total``:

    - each rank's training forward passes are its start-up passes (those the uninterrupted run
      made before its first step) followed by exactly the uninterrupted run's micro-batches of
      steps at+1..total: steps 1..at were not recomputed, and the data position was restored;
    - metrics.jsonl keeps the tagged lines of steps ≤ at and has fresh lines for steps > at,
      the first of them at step at + 1."""
    for rank in range(ranks):
        full, got = training_forwards(full_log, rank), training_forwards(resumed_log, rank)
        steps = total * micro_per_step
        assert len(full) >= steps, (rank, len(full))
        startup = full[: len(full) - steps]
        after = full[len(full) - (total - at) * micro_per_step:]
        assert len(got) == len(startup) + len(after), (
            f"rank {rank}: {len(got)} training forward passes after resuming at step {at}; "
            f"{len(startup)} start-up + {len(after)} expected (a restart makes {len(full)})")
        assert got == startup + after, f"rank {rank}: other batches than the uninterrupted run's"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r.get(TAG, False) == (r["step"] <= at) for r in rows), [
        (r["step"], r.get(TAG, False)) for r in rows]
    train_steps = [r["step"] for r in rows if "loss" in r and not r.get(TAG)]
    assert train_steps and train_steps[0] == at + 1, train_steps
