"""The recipe driver: ``python -m riemann_zero.train RECIPE.yaml [dotted.key=value ...]``.

Read top to bottom: parse the recipe, check everything that can fail without weights
(:mod:`~riemann_zero.train.preflight`), then :func:`~riemann_zero.train.loop.run_training`: start
the process group, load data, load the model, attach LoRA, initialise, build the optimizer and the
engine (DeepSpeed from the recipe's ``deepspeed:`` block, or FSDP2), then loop. Outputs under
``output_dir``: ``metrics.jsonl`` (one JSON line per step, rank 0), ``checkpoints/`` (atomic;
``resume=auto`` continues exactly), ``adapter/`` (stock PEFT) and ``run.json`` (resolved recipe,
versions, git commit, wall time).

One process: ``python -m riemann_zero.train R.yaml``. Many: ``deepspeed launch/run.sh R.yaml`` or
``bash launch/run.sh R.yaml``; with ``engine: fsdp2``: ``torchrun --nproc_per_node N -m
riemann_zero.train R.yaml``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from riemann_zero.io import git_commit, versions, write_json
from riemann_zero.progress import configure_logging, say
from riemann_zero.train.checkpoint import CheckpointError
from riemann_zero.train.lock import RunLock
from riemann_zero.train.loop import Diverged, run_training
from riemann_zero.train.preflight import preflight
from riemann_zero.train.recipe import Recipe, RecipeError, load_recipe, recipe_to_dict

__all__ = ["main", "cli", "parse_args", "run_eval_stage", "STOP_EXIT_CODE", "DIVERGED_EXIT_CODE"]

REPO = Path(__file__).resolve().parents[2]
STOP_EXIT_CODE = 75  # exit status of a run stopped on purpose by ``stop_after``
DIVERGED_EXIT_CODE = 3  # a non-finite loss, gradient norm or parameter stopped the run


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """Split ``[--local_rank=N] RECIPE.yaml [k=v ...]`` (DeepSpeed's launcher adds --local_rank)."""
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--local_rank":
            skip = i + 1 < len(argv)
        elif not a.startswith("--local_rank="):
            args.append(a)
    if args and args[0] in ("-h", "--help"):
        from riemann_zero.train.help import help_text

        print(help_text())
        raise SystemExit(0)
    if not args or "=" in args[0]:
        print("usage: python -m riemann_zero.train RECIPE.yaml [dotted.key=value ...]\n"
              "  e.g. python -m riemann_zero.train recipes/smollm2_commonsense.yaml smoke=true "
              "output_dir=/tmp/smoke\n  every section and key: python -m riemann_zero.train "
              "--help", file=sys.stderr)
        raise SystemExit(2)
    return args[0], args[1:]


def _setup_process_env() -> bool:
    """Environment for CPU runs and launcher-less single processes. Returns True on CPU."""
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # started without a launcher: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:
        # Share the cores between the ranks of this node: oversubscribed ranks run ~13x slower.
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
        local = int(local or os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    return on_cpu


def _record_end(out: Path, info: dict, status: str, err: BaseException, rank: int) -> None:
    """Rank 0 marks a run that stopped on an error in its run.json (when it wrote one), so the
    record never says ``running`` for a run that is gone."""
    if rank == 0 and (out / "run.json").is_file():
        write_json(out / "run.json", {**info, "status": status,
                                      "error": f"{type(err).__name__}: {err}"})


def main(argv: list[str] | None = None) -> int:
    """Run one recipe; returns a process exit code."""
    recipe_path, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.time()
    recipe = load_recipe(recipe_path, overrides)
    on_cpu = _setup_process_env()
    configure_logging(recipe.log_level)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    out = Path(recipe.output_dir)
    with RunLock(out, rank) as lock:  # one run per output_dir, before anything loads
        for note in lock.notes:
            say(note)
        # Everything that can fail without weights fails here, on every rank, before heavy work.
        plan = preflight(recipe, world_size=world)
        for note in plan.notes:
            say(note)
        if plan.memory is not None:
            say(plan.memory.table())
        if plan.finished:
            say(f"{out} already holds a finished run of this recipe; nothing to train "
                       f"(delete that directory to start over)")
        else:
            info = {"recipe": recipe_to_dict(recipe), "recipe_file": str(recipe_path),
                    "overrides": overrides, "model_path": plan.model_path,
                    "world_size": world, "versions": versions(),
                    "git_commit": git_commit(REPO), "status": "running"}
            try:
                result = run_training(recipe, plan, rank=rank, world=world, on_cpu=on_cpu,
                                      run_info=info)
            except Diverged as err:  # every rank saw the same reduced values: stop together
                _record_end(out, info, "diverged", err, rank)
                _shutdown()
                raise
            except BaseException as err:
                _record_end(out, info, "failed", err, rank)
                _shutdown(barrier=False)
                raise
            if result.get("stopped"):  # simulated crash (resume tests): no adapter
                if rank == 0:
                    write_json(out / "run.json", {**info, "status": "stopped",
                                                  "stopped_after": recipe.stop_after})
                sys.stdout.flush()
                lock.release()
                os._exit(STOP_EXIT_CODE)
            if rank == 0:
                info.update(result, status="finished", wall_time_s=round(time.time() - t_start, 3))
                write_json(out / "run.json", info)
                say(f"done in {info['wall_time_s']:.0f} s: {info['adapter']}")
            _shutdown()
        if rank == 0 and recipe.eval_after.suite:
            run_eval_stage(recipe)
    return 0


def _shutdown(barrier: bool = True) -> None:
    """Shut gloo down in order (its threads abort at interpreter exit); ``barrier=False`` when
    the other ranks may not get there."""
    import torch.distributed as dist

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


class EvalStageError(RuntimeError):
    """Training finished but the eval stage did not; the message says how to rerun it."""


def run_eval_stage(recipe: Recipe) -> None:
    """The benchmark stage (``python -m eval RUN_DIR --suite S --limit N``), rank 0, all cores."""
    if not (REPO / "eval" / "__main__.py").is_file():
        print("[riemann_zero] eval stage not available (eval/__main__.py is missing): skipping "
              "the before/after table", flush=True)
        return
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")}
    env.update(OMP_NUM_THREADS=str(os.cpu_count() or 1), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "eval", str(Path(recipe.output_dir).resolve()), "--suite",
           recipe.eval_after.suite, "--limit", str(recipe.eval_after.limit), "--log-level",
           recipe.log_level]
    if recipe.eval_after.tasks:
        cmd += ["--tasks", ",".join(recipe.eval_after.tasks)]
    say(" ".join(cmd))
    status = subprocess.run(cmd, cwd=str(REPO), env=env).returncode  # prints its own table
    if status != 0:
        adapter = Path(recipe.output_dir) / "adapter"
        raise EvalStageError(f"the eval stage exited with status {status} (its message is "
                             f"above); the trained adapter is in {adapter}; rerun the stage "
                             f"alone with: python {' '.join(cmd[1:])}")


def cli(argv: list[str] | None = None) -> int:
    """``main`` with the errors a user can fix printed as one line instead of a traceback: a
    recipe error (exit status 2), a divergence (3, rank 0 prints it), a checkpoint that cannot
    be written or read, or an eval stage that failed after training (1)."""
    rank = os.environ.get("RANK", "0")
    try:
        return main(argv)
    except RecipeError as err:
        print(f"riemann_zero.train: error: {err}", file=sys.stderr, flush=True)
        return 2
    except Diverged as err:
        if rank == "0":
            print(f"riemann_zero.train: {err}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT_CODE
    except (CheckpointError, EvalStageError) as err:
        print(f"riemann_zero.train: error: {err}", file=sys.stderr, flush=True)
        return 1
