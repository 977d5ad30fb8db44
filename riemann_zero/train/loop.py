"""The training loop behind ``python -m riemann_zero.train``, in named phases that only call
down: setup (process group, run.json), data, model and engine, resume, the steps (metrics, eval
loss, checkpoints), and the exported adapter.

Every logged step writes one line to ``metrics.jsonl`` (rank 0): loss, lr, tokens, tokens/s, step
and optimizer time, epoch; for optimizers whose registry row says so, the manifold health
(``manifold/orth_err_U`` …, a collective, so computed on logged steps only); and for the manifold
optimizers their own communication of that step, bytes by collective (``comm/all_reduce.gram_m``
…), both named by :func:`riemann_zero.optim.metrics.step_metrics`; and every rank's peak resident
memory so far (``peak_rss_mib``, one value per rank, also in run.json and in the "engine ready"
line).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from riemann_zero.io import write_json
from riemann_zero.optim import registry
from riemann_zero.optim.metrics import step_metrics
from riemann_zero.progress import say, stage
from riemann_zero.train import checkpoint as ckpt
from riemann_zero.train.batches import RunData, load_data
from riemann_zero.train.build import build_model, build_optimizer, lr_lambda
from riemann_zero.train.engines import Engine, engine_for
from riemann_zero.train.engines.loading import load_kind
from riemann_zero.train.preflight import Plan
from riemann_zero.train.recipe import Recipe, RecipeError
from riemann_zero.train.steps import (
    Diverged,
    MetricsLog,
    StepResult,
    Tally,
    divergence,
    eval_loss,
    nonfinite,
    nonfinite_values,
    peak_rss,
    save_outputs,
    skip_allowance,
    state_bytes,
    train_step,
    trainable,
)

__all__ = ["run_training", "Diverged"]


@dataclass
class _Run:
    """What every phase of one run reads: the recipe, its plan and engine, and this process."""

    recipe: Recipe
    plan: Plan
    engine: Engine
    rank: int
    world: int
    out: Path
    t0: float


def run_training(recipe: Recipe, plan: Plan, *, rank: int, world: int, on_cpu: bool,
                 run_info: dict[str, Any]) -> dict[str, Any]:
    """Train as the recipe says; returns a summary for run.json (or ``{"stopped": True}``)."""
    run = _Run(recipe, plan, plan.engine or engine_for(recipe), rank, world,
               Path(recipe.output_dir), time.perf_counter())
    device = _setup(run, on_cpu, run_info)
    data = load_data(recipe, plan.model_path, rank=rank, world=world)
    total = _total_steps(run, data)
    rss_loaded = _model_and_engine(run, data, device, total)
    start = _resume(run)
    log = MetricsLog(run.out, recipe.logging, rank=rank, start=start, config=run_info)
    tally = _train(run, data, log, start, total)
    if tally is None:
        return {"stopped": True}
    return _finish(run, data, log, tally, total, rss_loaded)


def _setup(run: _Run, on_cpu: bool, run_info: dict[str, Any]) -> torch.device:
    """This rank's device, the engine's process group, and the run's folder with run.json."""
    device = torch.device("cpu")
    if not on_cpu:  # one GPU per local rank; LOI's backward passes already run there
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    run.engine.init_distributed("gloo" if on_cpu else "nccl")
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "run.json", run_info)
    dist.barrier()
    return device


def _total_steps(run: _Run, data: RunData) -> int:
    """Optimizer steps of the run (``max_steps``, else the epochs), said with the data."""
    recipe, plan = run.recipe, run.plan
    mb, gas = recipe.train.micro_batch_size, plan.grad_accum
    steps_per_epoch = data.micro_per_epoch // gas
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.train)} training examples make no full optimizer step of "
                         f"{plan.global_batch} examples; lower the batch or add data")
    total = recipe.max_steps or max(1, int(recipe.train.epochs * steps_per_epoch))
    say(f"data ready ({time.perf_counter() - run.t0:.0f} s): {len(data.train)} train / "
        f"{len(data.eval)} eval examples; global batch {plan.global_batch} = {mb} x {gas} x "
        f"{run.world}; {total} steps ({total / steps_per_epoch:.2f} epochs)")
    return total


def _what_trains(recipe: Recipe, plan: Plan) -> str:
    """The stage line's account of what the run trains."""
    if plan.trainable:
        return f"training {len(plan.trainable)} whole parameters (no adapter)"
    if recipe.adapter.type != "lora":
        return f"with {recipe.adapter.type.upper()} adapters and {recipe.init.method} init"
    return f"with LoRA r={recipe.lora.r} and {recipe.init.method} init"


def _model_and_engine(run: _Run, data: RunData, device: torch.device, total: int
                      ) -> list[float]:
    """Build the model, hand it and its optimizer factory to the engine, finish a partitioned
    load; returns every rank's peak RSS once loaded."""
    from transformers import set_seed

    recipe, plan, engine, world = run.recipe, run.plan, run.engine, run.world
    calibration = data.calibration(recipe.init.batches, device)
    set_seed(recipe.seed)  # the same initial adapter on every rank
    load = load_kind(plan.load_mode)
    with stage(f"loading {recipe.model.name_or_path} {load.says} {_what_trains(recipe, plan)}"):
        model, finish = build_model(recipe, plan, calibration, engine, device,
                                    reduce=(lambda t: dist.all_reduce(t)) if world > 1 else None,
                                    world=world)
    set_seed(recipe.seed + 1 + run.rank)  # then independent dropout masks per rank
    engine.start(model, lambda m: build_optimizer(recipe, m),
                 lr_lambda(recipe, total), config=plan.deepspeed,
                 grad_accum=plan.grad_accum, device=device)
    if finish is not None:  # partitioned load: this rank's weights, then the adapters' start
        with stage(f"reading this rank's part of the base and {recipe.init.method} init"
                   if load.after_sharding
                   else f"{recipe.init.method} init on the partitioned model"):
            finish()
    rss_loaded = peak_rss(run.rank, world)
    say(f"{recipe.engine} engine ready ({time.perf_counter() - run.t0:.0f} s); peak RSS per rank "
        f"{', '.join(f'{v:.0f}' for v in rss_loaded)} MiB")
    return rss_loaded


def _resume(run: _Run) -> int:
    """The engine's state, then this rank's loop state and RNG streams, from ``resume_from``;
    returns the step to continue after (0: a fresh start)."""
    plan = run.plan
    if plan.resume_from is None:
        return 0
    _, read_state = run.engine.io(exclude_frozen=True)
    try:
        read_state(plan.resume_from)
    except Exception as err:
        raise ckpt.CheckpointError(
            f"reading checkpoint {plan.resume_from} failed ({type(err).__name__}: {err}); "
            f"resume from an earlier one with resume=PATH or delete output_dir") from err
    state = ckpt.load_trainer_state(plan.resume_from, run.rank)
    ckpt.set_rng_state(state["rng"])
    start = int(state["step"])
    bad = torch.tensor([len(nonfinite(trainable(run.engine.module)))], dtype=torch.float64)
    dist.all_reduce(bad)
    if bad.item():
        older = [p for p in ckpt.list_checkpoints(run.out / "checkpoints")
                 if p.name < plan.resume_from.name]
        fix = (f"resume from the newest earlier checkpoint with resume={older[-1]}"
               if older else "no earlier checkpoint is left: delete output_dir to start over")
        raise RecipeError(f"checkpoint {plan.resume_from} holds non-finite values in "
                          f"{int(bad.item())} trainable tensors; {fix}")
    say(f"resumed from {plan.resume_from} at step {start}")
    return start


def _train(run: _Run, data: RunData, log: MetricsLog, start: int, total: int) -> Tally | None:
    """Steps ``start + 1 .. total``: metrics, eval loss and checkpoints as the recipe says.
    Returns the tally, or None where ``stop_after`` stopped the run."""
    from tqdm import tqdm

    recipe, engine, rank, world = run.recipe, run.engine, run.rank, run.world
    tc = recipe.train
    if tc.eval_every and start == 0:
        log.emit({"step": 0, "eval_loss": eval_loss(engine, data, recipe, rank, world)})
    engine.train(True)
    bar = tqdm(total=total, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    tally = Tally(allowance=skip_allowance(recipe), newest=run.plan.resume_from)
    params = trainable(engine.module)
    health = registry.spec(recipe.optimizer.name).health
    for step in range(start + 1, total + 1):
        lr = engine.lr()
        result = train_step(engine, data, step, run.plan.grad_accum, params, rank, world)
        record = _checked_record(run, data, result, step, lr, tally, bar)
        if step % tc.log_every == 0 or step == total:  # the same steps on every rank
            record.update(step_metrics(engine.client_optimizer, health=health))
            log.emit(record)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        if tc.eval_every and step % tc.eval_every == 0 and step != total:
            log.emit({"step": step, "eval_loss": eval_loss(engine, data, recipe, rank, world)})
        if tc.save_every and step % tc.save_every == 0:
            tally.newest = _save_checkpoint(run, step, params, tally.newest, bar)
        if recipe.stop_after is not None and step == recipe.stop_after:
            bar.close()
            say(f"stopping after step {step} (stop_after)")
            log.close()
            return None
    bar.close()
    return tally


def _checked_record(run: _Run, data: RunData, result: StepResult, step: int, lr: float,
                    tally: Tally, bar: Any) -> dict[str, Any]:
    """The step's metrics record, once its values are known to be finite: a poisoned update is
    Diverged at once, a non-finite loss or gradient norm whose update the engine skipped is
    tolerated ``tally.allowance`` times."""
    grad_norm = run.engine.grad_norm()
    what = nonfinite_values(result, grad_norm)
    if result.bad_tensors:  # the update itself is poisoned: nothing to skip
        bar.close()
        raise divergence(step, lr, " and ".join(what + [f"values in {result.bad_tensors} "
                                                        f"trainable tensors"]), tally.newest)
    if what:
        tally.skipped += 1
        if tally.skipped > tally.allowance:
            bar.close()
            raise divergence(step, lr, " and ".join(what), tally.newest)
        if run.rank == 0:
            bar.write(f"[riemann_zero] step {step}: non-finite {' and '.join(what)}; the engine "
                      f"skipped the update ({tally.skipped} of {tally.allowance} allowed)")
    tally.count(result)
    gas = run.plan.grad_accum
    record = {"step": step, "loss": result.loss, "lr": lr, "tokens": result.tokens,
              "tokens_per_s": result.tokens / result.step_time, "step_time_s": result.step_time,
              "optim_time_s": result.optim_time, "epoch": (step * gas) / data.micro_per_epoch,
              "peak_rss_mib": result.peak_rss_mib}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    if what:
        record["skipped"] = True
    return record


def _save_checkpoint(run: _Run, step: int, params: list, newest: Path | None, bar: Any) -> Path:
    """One checkpoint of the engine's state and this rank's loop state; returns its folder."""
    t_save = time.perf_counter()
    write_state, _ = run.engine.io(exclude_frozen=True)
    expected = ckpt.checkpoint_bytes(newest) if newest else state_bytes(params)
    newest = ckpt.save_checkpoint(
        run.out / "checkpoints", step, write_engine_state=write_state,
        trainer_state={"step": step, "micro_batches": step * run.plan.grad_accum},
        rank=run.rank, barrier=dist.barrier, keep_last=run.recipe.train.keep_last,
        expected_bytes=expected)
    if run.rank == 0:
        bar.write(f"[riemann_zero] checkpoint {newest.name}: "
                  f"{ckpt.checkpoint_bytes(newest) / 2**20:.1f} MiB in "
                  f"{time.perf_counter() - t_save:.1f} s")
    return newest


def _finish(run: _Run, data: RunData, log: MetricsLog, tally: Tally, total: int,
            rss_loaded: list[float]) -> dict[str, Any]:
    """The final eval loss, the exported adapter (or trained parameters), the summary."""
    final = eval_loss(run.engine, data, run.recipe, run.rank, run.world)
    log.emit({"step": total, "eval_loss": final})
    log.close()
    manifold = registry.spec(run.recipe.optimizer.name).layout == "manifold"
    saved = save_outputs(run.engine, run.out, list(run.plan.trainable), manifold=manifold,
                         rank=run.rank)
    dist.barrier()
    return {"steps": total, "first_loss": tally.first_loss, "final_loss": tally.last_loss,
            "final_eval_loss": final, "tokens": tally.tokens, "load": run.plan.load_mode,
            "peak_rss_mib_loaded": rss_loaded, "peak_rss_mib": peak_rss(run.rank, run.world),
            "adapter": str(saved)}
