"""The recipe driver: ``python -m riemann_zero.train RECIPE.yaml [dotted.key=value ...]``.

Read top to bottom: parse the recipe, check everything that can fail without weights
(``recipe.preflight``), start the process group, load data, load the model, attach LoRA,
initialise, build the optimizer and the engine (DeepSpeed from the recipe's ``deepspeed:`` block,
or FSDP2), then loop. Outputs under ``output_dir``: ``metrics.jsonl`` (one JSON line per step, rank
0), ``checkpoints/`` (atomic; ``resume=auto`` continues exactly), ``adapter/`` (stock PEFT) and
``run.json`` (resolved recipe, versions, git commit, wall time).

One process: ``python -m riemann_zero.train R.yaml``. Many: ``deepspeed launch/run.sh R.yaml`` or
``bash launch/run.sh R.yaml``; with ``engine: fsdp2``: ``torchrun --nproc_per_node N -m
riemann_zero.train R.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from riemann_zero.preflight import Plan, preflight
from riemann_zero.recipe import Recipe, RecipeError, load_recipe, recipe_to_dict

__all__ = ["main", "cli", "parse_args", "lr_lambda", "batch_order", "build_model",
           "build_optimizer", "deepspeed_config", "run_eval_stage", "STOP_EXIT_CODE"]

REPO = Path(__file__).resolve().parent.parent
STOP_EXIT_CODE = 75  # exit status of a run stopped on purpose by ``stop_after``


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
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        raise SystemExit("usage: python -m riemann_zero.train RECIPE.yaml [dotted.key=value ...]\n"
                         "  e.g. python -m riemann_zero.train recipes/smollm2_commonsense.yaml "
                         "max_steps=3 output_dir=/tmp/x")
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


def lr_lambda(recipe: Recipe, total_steps: int):
    """Multiplier of the base lr at a step: linear warm-up, then linear, cosine or constant."""
    sc = recipe.schedule
    warmup = sc.warmup_steps if sc.warmup_steps is not None else int(sc.warmup_ratio * total_steps)
    floor = sc.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if sc.type == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if sc.type == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return fn


def batch_order(n: int, *, seed: int, epoch: int, rank: int, world: int, micro: int) -> list:
    """Example indices of each micro-batch of one epoch on one rank. Deterministic, so the
    data-loader position saved in a checkpoint is just a count of micro-batches."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    mine = perm[: (n // world) * world][rank::world].tolist()
    return [mine[i:i + micro] for i in range(0, len(mine) - micro + 1, micro)]


def build_model(recipe: Recipe, plan: Plan, calibration: list[dict], device: Any = "cpu",
                reduce: Any = None, world: int = 1) -> Any:
    """Base model + LoRA (+ LOI) on ``device``.

    Args:
        recipe, plan: the run.
        calibration: this rank's LOI calibration batches, already on ``device``.
        device: where the model lives.
        reduce: in-place sum over ranks of LOI's sketches and LoRA-GA's gradients (None for one
            process), so that every rank ends with the same initial point.
        world: number of ranks summed by ``reduce``.
    """
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    bf16 = bool(recipe.deepspeed.get("bf16", {}).get("enabled", False))
    dtype = {"auto": torch.bfloat16 if bf16 else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[recipe.model.dtype]
    base = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype).to(device)
    if recipe.model.gradient_checkpointing:
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    lc = recipe.lora
    config = LoraConfig(r=lc.r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout,
                        target_modules=list(lc.target_modules), bias="none", task_type="CAUSAL_LM")
    if recipe.init.method == "peft":
        from peft import get_peft_model

        model = get_peft_model(base, config)
        if recipe.optimizer.name == "stella":  # U S Vᵀ with orthonormal U, V (StelLA's default)
            from riemann_zero.stella import stella_init

            stella_init(model, seed=recipe.seed)
        return model
    if recipe.init.method in ("pissa", "lora_ga"):
        from riemann_zero.peft_inits import peft_init_model

        return peft_init_model(base, config, recipe.init.method, calibration=calibration,
                               niter=recipe.init.niter, reduce=reduce, world=world)
    import riemann_zero as rz

    init = "random" if recipe.init.method == "random" else "zero"
    model = rz.get_peft_model(base, config, init=init, seed=recipe.seed)
    if recipe.init.method == "loi":
        rz.loi_init(model, calibration, p=recipe.init.p, q=recipe.init.q,
                    alpha=recipe.init.alpha, seed=recipe.seed, reduce=reduce)
    return model


def build_optimizer(recipe: Recipe, model: Any) -> Any:
    """The recipe's optimizer on the (PEFT) model."""
    oc = recipe.optimizer
    if oc.name == "stella":
        from riemann_zero.stella import StelLA

        return StelLA(model, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                      weight_decay=oc.weight_decay)
    if oc.name in ("adamw", "muon", "rprec_adamw"):
        from riemann_zero.baselines import build_baseline_optimizer

        return build_baseline_optimizer(oc.name, model, lr=oc.lr, weight_decay=oc.weight_decay,
                                        momentum=oc.momentum, betas=tuple(oc.betas), eps=oc.eps,
                                        reg=oc.reg)
    import riemann_zero as rz

    if oc.name == "riemannion":
        return rz.Riemannion(model, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    if oc.name == "riemann_sgd":
        return rz.RiemannSGD(model, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    return rz.RiemannAdam(model, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                          weight_decay=oc.weight_decay)


def deepspeed_config(recipe: Recipe, plan: Plan, world: int) -> dict[str, Any]:
    """The recipe's ``deepspeed:`` block completed with the batch layout of the train section."""
    cfg = {k: v for k, v in copy.deepcopy(recipe.deepspeed).items() if v != "auto"}
    cfg.update(train_micro_batch_size_per_gpu=recipe.train.micro_batch_size,
               gradient_accumulation_steps=plan.grad_accum, train_batch_size=plan.global_batch,
               gradient_clipping=recipe.train.gradient_clipping,
               zero_allow_untested_optimizer=True)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "deepspeed", "riemann-zero"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run one recipe; returns a process exit code."""
    recipe_path, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.time()
    recipe = load_recipe(recipe_path, overrides)
    on_cpu = _setup_process_env()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    # Everything that can fail without weights fails here, on every rank, before heavy work.
    plan = preflight(recipe, world_size=world)
    out = Path(recipe.output_dir)
    if plan.finished:
        if rank == 0:
            print(f"[riemann_zero] {out} already holds a finished run of this recipe; nothing to "
                  f"train (delete that directory to start over)", flush=True)
    else:
        from riemann_zero.train_loop import run_training

        info = {"recipe": recipe_to_dict(recipe), "recipe_file": str(recipe_path),
                "overrides": overrides, "world_size": world, "versions": _versions(),
                "git_commit": _git_commit(), "status": "running"}
        result = run_training(recipe, plan, rank=rank, world=world, on_cpu=on_cpu,
                              run_info=info)
        if result.get("stopped"):  # simulated crash (resume tests): no adapter, no final run.json
            sys.stdout.flush()
            os._exit(STOP_EXIT_CODE)
        if rank == 0:
            info.update(result, status="finished", wall_time_s=round(time.time() - t_start, 3))
            write_json(out / "run.json", info)
            print(f"[riemann_zero] done in {info['wall_time_s']:.0f} s: {out / 'adapter'}",
                  flush=True)
        import torch.distributed as dist

        if dist.is_initialized():  # shut gloo down in order: its threads abort at interpreter exit
            dist.barrier()
            dist.destroy_process_group()
    if rank == 0 and recipe.eval_after.suite:
        run_eval_stage(recipe)
    return 0


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
           recipe.eval_after.suite, "--limit", str(recipe.eval_after.limit)]
    if recipe.eval_after.tasks:
        cmd += ["--tasks", ",".join(recipe.eval_after.tasks)]
    print("[riemann_zero] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=str(REPO), env=env, check=True)
    table = Path(recipe.output_dir).resolve() / "eval" / "results.md"
    if table.is_file():  # the before/after table, where the user is looking
        print("\n" + table.read_text(), flush=True)


def cli(argv: list[str] | None = None) -> int:
    """``main`` with recipe errors printed as one line instead of a traceback (exit status 2)."""
    try:
        return main(argv)
    except RecipeError as err:
        print(f"riemann_zero.train: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
