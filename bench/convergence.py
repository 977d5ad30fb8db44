"""Convergence and quality: Riemannion against LoRA with AdamW, on a budget where AdamW has settled.

SmolLM2-135M (all 30 layers) on the commonsense mixture, one process per run, every run through
the training driver (``python -m riemann_zero.train recipes/smollm2_commonsense.yaml k=v ...``)
and every final adapter through the eval stage (``python -m eval RUN --suite commonsense``).
For a given seed every method sees the same examples in the same order. The protocol:

1. grids: seed 0 at each lr of the method's grid (1-3 series, log-spaced); the best lr is the one
   with the lowest final held-out loss (mean of the evaluations over the last 30 % of the
   steps), and a grid whose best is an end point is extended past
   that end until the best is strictly inside (Riemannion + LOI, AdamW, and the two ablations
   that need their own lr);
2. seeds: Riemannion + LOI and AdamW again at their best lr with the other seeds;
3. ablations, one seed at the best lr: Riemannion with zero init, with ``lr_scale="rms"`` (its
   own small grid around AdamW's lr), StelLA (AdamW's lr: an Adam-type step), per-factor Muon
   (Riemannion's lr: both take orthogonalised steps) and RiemannSGD + LOI (its own grid);
4. eval: protocols (a) and (b) on ``--eval-limit`` documents per task for every final adapter.

``--lanes`` runs that many jobs at once (one thread each); jobs start as soon as what they need
is finished, in the order above. A killed run resumes from its last checkpoint (``--save-every``)
and a finished run or evaluation is never redone, so the protocol runs in pieces:
``--hours`` stops starting jobs after that long. What the protocol decides from is the per-run
records in ``OUT/records`` (``convergence_records.py``), kept in git: a piece on a fresh clone
carries on from them, training again only a run whose adapter an evaluation still needs.
``bench/convergence_report.py`` (also called at the end) turns the records into
``OUT/convergence.json``, ``convergence.md`` and the plots.

    python bench/convergence.py --hours 2.5     # a piece; rerun until it reports 0 jobs left
    python bench/convergence_report.py          # tables and plots from the finished runs
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from convergence_protocol import (  # noqa: F401 (the protocol's names, re-exported for tests)
    MAX_EXTEND,
    METHODS,
    RECIPE,
    REPO,
    Job,
    Protocol,
    Records,
    busy,
    final_eval_loss,
    next_lr,
    parse_run,
    parser,
    run_name,
)
from convergence_report import report


def _env() -> dict[str, str]:
    """Offline, one thread per lane, no inherited launcher variables: each run is one process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _command(job: Job, a) -> list[str]:
    if job.kind == "train":
        return [sys.executable, "-m", "riemann_zero.train", str(RECIPE), *job.args]
    return [sys.executable, "-m", "eval", str(Path(a.out) / "runs" / job.name), "--suite",
            "commonsense", "--limit", str(a.eval_limit), *job.args]


def _launch(job: Job, a, lane_threads: int) -> subprocess.Popen:
    logs = Path(a.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(_env(), OMP_NUM_THREADS=str(lane_threads))
    log = open(logs / f"{job.name}.{job.kind}.log", "a")  # noqa: SIM115 (closed on exit)
    return subprocess.Popen(_command(job, a), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _after(job: Job, rc: int, a, log) -> bool:
    """Records a run that diverged (its final loss is +inf); False for any other failure."""
    if rc == 0:
        return True
    text = (Path(a.out) / "logs" / f"{job.name}.{job.kind}.log").read_text()[-4000:]
    if job.kind == "train" and "training diverged at step" in text:
        line = next(x for x in text.splitlines()[::-1] if "training diverged" in x)
        (Path(a.out) / "runs" / job.name / "diverged.txt").write_text(line + "\n")
        log(f"{job.name} diverged: {line.strip()}")
        return True
    log(f"{job.kind} {job.name} failed ({rc}); see {a.out}/logs/{job.name}.{job.kind}.log")
    return False


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    unknown = [m for m in a.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    proto, t0 = Protocol(a), time.time()

    def log(msg: str) -> None:
        print(f"[convergence {time.strftime('%H:%M:%S')} +{time.time() - t0:5.0f} s] {msg}",
              flush=True)

    if a.dry_run:
        for job in proto.pending():
            print(job.kind, job.name)
        return 0
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    failed: set[str] = set()
    threads = max(1, (os.cpu_count() or 1) // a.lanes)
    while True:
        late = a.hours is not None and time.time() - t0 > 3600 * a.hours
        jobs = [j for j in proto.pending() if f"{j.kind}:{j.name}" not in running]
        ready = [j for j in jobs if proto.startable(j) and f"{j.kind}:{j.name}" not in failed]
        foreign = len(jobs) - sum(proto.startable(j) for j in jobs)  # lanes others hold
        while not late and ready and len(running) + foreign < a.lanes:
            job = ready.pop(0)
            running[f"{job.kind}:{job.name}"] = (job, _launch(job, a, threads), time.time())
            log(f"started {job.kind} {job.name}")
        if not running and not foreign:
            break
        time.sleep(10)
        for key, (job, proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            if _after(job, proc.returncode, a, log):
                log(f"{job.kind} {job.name} done in {time.time() - started:.0f} s")
            else:
                failed.add(key)
    left = proto.pending()
    log(f"{len(left)} job(s) ready and not run; {len(failed)} failed"
        + ("" if left or failed else "; the protocol may still add jobs: rerun to be sure"))
    report(a)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
