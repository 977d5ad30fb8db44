"""The convergence protocol's definitions, shared by the scheduler (``convergence.py``) and the
report (``convergence_report.py``): the methods and their lr grids, run names, the final held-out
loss, and :class:`Protocol`, which decides the next jobs from the records alone.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
from dataclasses import dataclass
from pathlib import Path

from convergence_records import Records, finished

__all__ = ["DESCRIPTION", "MAX_EXTEND", "METHODS", "RECIPE", "REPO", "Job", "Method", "Protocol",
           "Records", "busy", "final_eval_loss", "next_lr", "parse_run", "parser", "run_name",
           "tail_mean"]

DESCRIPTION = ("Convergence and quality: Riemannion against LoRA with AdamW, on a budget where "
               "AdamW has settled.")

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_commonsense.yaml"
OUT = REPO / "bench" / "results" / "convergence"

_RIEMANNION = ("optimizer.name=riemannion", "optimizer.weight_decay=0.00316",
               "optimizer.momentum=0.9")
_ADAMW = ("optimizer.name=adamw", "init.method=peft", "optimizer.weight_decay=0.01")


@dataclass(frozen=True)
class Method:
    """A row of the protocol: its recipe overrides and where its lr comes from."""

    overrides: tuple[str, ...]
    grid: tuple[float, ...] = ()  # its own grid at seed 0, extended until the best is inside
    grid_from: str | None = None  # its own 3-point grid centred on that method's best lr
    lr_from: str | None = None  # no grid: that method's best lr
    primary: bool = False  # all seeds (the others run seed 0 only)


METHODS: dict[str, Method] = {
    "riemannion+loi": Method(_RIEMANNION + ("init.method=loi",),
                             grid=(1e-3, 3e-3, 1e-2, 3e-2), primary=True),
    "adamw": Method(_ADAMW, grid=(3e-4, 1e-3, 3e-3, 1e-2), primary=True),
    "riemannion+zero": Method(_RIEMANNION + ("init.method=zero",), lr_from="riemannion+loi"),
    "riemannion+loi+rms": Method(
        _RIEMANNION + ("init.method=loi", "optimizer.options.lr_scale=rms"), grid_from="adamw"),
    "stella": Method(("optimizer.name=stella", "init.method=peft"), lr_from="adamw"),
    "muon": Method(("optimizer.name=muon", "init.method=peft", "optimizer.weight_decay=0.2",
                    "optimizer.momentum=0.95"), lr_from="riemannion+loi"),
    "riemann_sgd+loi": Method(("optimizer.name=riemann_sgd", "init.method=loi",
                               "optimizer.momentum=0.9"), grid=(3e-2, 1e-1, 3e-1)),
}
MAX_EXTEND = 3  # grid points added past one end before the method is reported as unbracketed
TAIL = 0.7  # the final held-out loss averages the evaluations from this fraction of the run on


@dataclass(frozen=True)
class Job:
    name: str  # the run directory under OUT/runs
    kind: str  # "train" or "eval"
    args: tuple[str, ...]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--model", default="asset:smollm2", help="recipe model.name_or_path")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the primary methods")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps (the token budget)")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=10, help="held-out loss every this many steps")
    p.add_argument("--eval-loss-examples", type=int, default=48)
    p.add_argument("--eval-limit", type=int, default=50,
                   help="documents per commonsense task for protocols (a) and (b); 0: no eval")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint period (resume point)")
    p.add_argument("--lanes", type=int, default=2, help="jobs at once, one thread each")
    p.add_argument("--hours", type=float, default=None, help="start no job after this long")
    p.add_argument("--dry-run", action="store_true", help="print the jobs ready now and exit")
    return p


def lr_name(lr: float) -> str:
    return f"{lr:g}"


def next_lr(lr: float, direction: int) -> float:
    """The neighbour of ``lr`` in the 1-3 series (…, 1e-3, 3e-3, 1e-2, …) up or down."""
    exp = round(math.log10(lr) * 2) / 2 + 0.5 * direction  # 1·10^k -> k, 3·10^k -> k + ½
    return float(f"{10 ** math.floor(exp) * (3 if exp % 1 else 1):.0e}")


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}_lr{lr_name(lr)}_s{seed}"


def busy(run: Path) -> bool:
    """Held by a live training process on this host (another scheduler's job, a manual run).
    The lock's pid must still be a ``riemann_zero.train`` process: after a reboot a killed run's
    stale pid may belong to anything else."""
    try:
        lock = json.loads((run / "run.lock").read_text())
        cmdline = Path(f"/proc/{int(lock['pid'])}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return lock.get("host") == socket.gethostname() and b"riemann_zero.train" in cmdline


def tail_mean(steps: list[int], losses: list[float]) -> float:
    """Mean held-out loss over the last 30 % of the steps (the evaluations at 110-150 of 150):
    one evaluation on 48 examples moves by ~0.01-0.02 from one to the next once a run has
    settled, as much as neighbouring lrs differ, so one point would pick the lr by noise."""
    return statistics.mean(x for s, x in zip(steps, losses) if s >= TAIL * steps[-1])


def final_eval_loss(record: dict) -> float:
    """A run record's final held-out loss (``tail_mean``); +inf for a run that diverged."""
    if record["status"] == "diverged":
        return float("inf")
    c = record["curve"]
    return tail_mean(c["eval_steps"], c["eval_loss"])


class Grid:
    """A method's grid as it stands: its points, and the best lr once it is bracketed."""

    def __init__(self, points: list[float], losses: dict[float, float]):
        self.points = sorted(points)
        self.losses = losses  # finished points only

    @property
    def complete(self) -> bool:
        return all(lr in self.losses for lr in self.points)

    @property
    def best(self) -> float | None:
        if not self.complete:
            return None
        return min(self.points, key=lambda lr: self.losses[lr])

    def extension(self) -> float | None:
        """The point to add when the best is an end point (None when bracketed or capped)."""
        best = self.best
        if best is None or len(self.points) < 2:
            return None
        if best == self.points[0]:
            return next_lr(best, -1)
        if best == self.points[-1]:
            return next_lr(best, +1)
        return None

    @property
    def bracketed(self) -> bool:
        best = self.best
        return best is not None and self.points[0] < best < self.points[-1]


class Protocol:
    """What has run and what may run next, read from the run records only."""

    def __init__(self, a):
        self.a = a
        self.records = Records(Path(a.out))
        self.root = self.records.runs
        self.methods = a.methods.split(",")

    def run(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str) -> bool:
        return self.records.train(name) is not None

    def loss(self, name: str) -> float:
        return final_eval_loss(self.records.train(name))

    def evaluated(self, name: str) -> bool:
        rec = self.records.eval(name)
        return rec is not None and rec["scores"]["adapter"]["limit"] == self.a.eval_limit

    def startable(self, job: Job) -> bool:
        return job.kind != "train" or not busy(self.run(job.name))

    def start_grid(self, m: str) -> tuple[float, ...] | None:
        spec = METHODS[m]
        if spec.grid:
            return spec.grid
        if spec.grid_from:
            centre = self.best_lr(spec.grid_from)
            return None if centre is None else (next_lr(centre, -1), centre, next_lr(centre, +1))
        return None

    def grid(self, m: str) -> Grid | None:
        """The grid with every extension made so far (a point is added only past a finished
        best end point, at most ``MAX_EXTEND`` of them)."""
        start = self.start_grid(m)
        if start is None:
            return None
        points = list(start)
        while True:
            g = Grid(points, {lr: self.loss(run_name(m, lr, 0)) for lr in points
                              if self.done(run_name(m, lr, 0))})
            ext = g.extension()
            if ext is None or _outside(points, start) >= MAX_EXTEND:
                return g
            points.append(ext)

    def best_lr(self, m: str) -> float | None:
        """The lr a method's other runs use: its grid's best once bracketed (or capped)."""
        spec = METHODS[m]
        if spec.lr_from:
            return self.best_lr(spec.lr_from)
        g = self.grid(m)
        if g is None or g.best is None:
            return None
        capped = _outside(g.points, self.start_grid(m)) >= MAX_EXTEND
        return g.best if g.bracketed or capped else None

    def train_job(self, m: str, lr: float, seed: int) -> Job:
        a = self.a
        common = (f"model.name_or_path={a.model}", f"max_steps={a.steps}",
                  f"train.micro_batch_size={a.batch}", "train.gradient_accumulation_steps=1",
                  f"data.max_length={a.max_length}", "data.train_limit=4000",
                  f"data.eval_limit={a.eval_loss_examples}", f"train.eval_every={a.eval_every}",
                  f"train.save_every={a.save_every}", f"lora.r={a.rank}",
                  f"lora.lora_alpha={2 * a.rank}", "lora.lora_dropout=0.05", "init.batches=2",
                  "schedule.type=linear", "schedule.warmup_ratio=0.1",
                  "deepspeed.zero_optimization.stage=0", "eval_after.suite=null")
        name = run_name(m, lr, seed)
        return Job(name, "train", (*common, *METHODS[m].overrides, f"optimizer.lr={lr}",
                                   f"seed={seed}", f"output_dir={self.run(name)}"))

    def finals(self, m: str) -> list[str]:
        """The runs scored by the eval stage: every seed of the method at its chosen lr."""
        lr = self.best_lr(m)
        if lr is None:
            return []
        seeds = self.a.seeds if METHODS[m].primary else 1
        return [run_name(m, lr, s) for s in range(seeds)]

    def pending(self) -> list[Job]:
        """Jobs whose inputs are finished and which are not, in protocol order: the primary
        grids (interleaved, middle points first), their seeds, the ablations, then training
        again the runs whose adapter an evaluation needs and is not on this machine. Evaluations
        of adapters that are here go first: an adapter outlives its machine only as a record."""
        self.records.sync()
        primary = [m for m in self.methods if METHODS[m].primary]
        evals: list[Job] = []
        jobs: list[Job] = []
        for group in (primary, [m for m in self.methods if m not in primary]):
            grids = {m: self.grid(m) for m in group}
            order = {m: sorted(g.points, key=lambda lr, g=g: abs(math.log(lr) - _mid(g.points)))
                     for m, g in grids.items() if g is not None}
            for i in range(max(map(len, order.values()), default=0)):  # round robin
                jobs += [self.train_job(m, pts[i], 0) for m, pts in order.items()
                         if i < len(pts) and not self.done(run_name(m, pts[i], 0))]
            for m in group:
                jobs += [self.train_job(m, *parse_run(name)) for name in self.finals(m)
                         if not self.done(name)]
        for m in self.methods if self.a.eval_limit else ():
            for name in self.finals(m):
                rec = self.records.train(name)
                if rec is None or rec["status"] != "finished" or self.evaluated(name):
                    continue  # not run yet, diverged (nothing to score), or scored
                if not finished(self.run(name)):  # recorded elsewhere: train it again
                    jobs.append(self.train_job(m, *parse_run(name)))
                    continue
                base = m == "adamw" and name.endswith("_s0")  # the base model's row
                evals.append(Job(name, "eval", () if base else ("--no-base",)))
        return evals + jobs


def _mid(points: list[float]) -> float:
    return (math.log(min(points)) + math.log(max(points))) / 2


def _outside(points: list[float], start: tuple[float, ...]) -> int:
    return sum(p < min(start) or p > max(start) for p in points)


def parse_run(name: str) -> tuple[float, int]:
    """``run_name``'s inverse: (lr, seed)."""
    stem, seed = name.rsplit("_s", 1)
    return float(stem.rsplit("_lr", 1)[1]), int(seed)

