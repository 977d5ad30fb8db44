"""Preflight: every check that can fail without weights, run on each rank before heavy work.

Data files (parsed: the file and line of a malformed record, empty files, a local file asked for
an eval split it does not have) and dataset names, the batch layout against the world size, the
engine's own checks (:meth:`~riemann_zero.train.engines.base.Engine.check`: DeepSpeed's config
schema), the optimizer against the engine's self-description, dtype and options (from
:mod:`riemann_zero.optim.registry`), target modules and the rank against the model's layers
(the model is built on the meta device from its ``config.json``), and whether ``output_dir``
already holds a run (same recipe: resume from the newest checkpoint whose files verify; a run
that stopped before its first checkpoint: replaced; another recipe: refuse), and whether the
per-rank memory estimate (:mod:`~riemann_zero.train.memory`) fits the device and the
host. Each failure is one :class:`~riemann_zero.train.recipe.RecipeError` naming the key and the
fix.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from riemann_zero import assets
from riemann_zero.adapters.layout import rank_error
from riemann_zero.adapters.loi import loi_rank_error
from riemann_zero.data.examples import DATASETS, HUB_DATASETS, has_eval_split, load_examples
from riemann_zero.optim import registry
from riemann_zero.optim.base import check_hyper
from riemann_zero.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    resume_point,
    verify_checkpoint,
)
from riemann_zero.train.engines import Engine, engine_for
from riemann_zero.train.engines.loading import WHOLE
from riemann_zero.train.memory import MemoryEstimate, estimate_memory, memory_error, memory_limits
from riemann_zero.train.recipe import (
    RUN_NEUTRAL_KEYS,
    Recipe,
    RecipeError,
    orthogonal_config,
    recipe_to_dict,
)

__all__ = ["Plan", "preflight", "load_mode", "resolve_model_path", "deepspeed_config"]

_DS_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping")


@dataclass
class Plan:
    """What :func:`preflight` resolved: where the model is, the batch layout, where to resume."""

    model_path: str
    model_config: Any
    grad_accum: int
    global_batch: int
    resume_from: Path | None
    finished: bool
    linear_shapes: dict[str, tuple[int, int]]
    # Full fine-tuning (model.trainable): the parameters the patterns matched, with their shapes.
    trainable: dict[str, tuple[int, ...]] = field(default_factory=dict)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # the engine's complete config
    notes: list[str] = field(default_factory=list)  # what rank 0 tells the user before training
    memory: MemoryEstimate | None = None  # the per-rank estimate (rank 0 prints its table)
    load_mode: str = WHOLE.name  # how the base is created (a name of engines.loading's kinds)
    engine: Engine | None = None  # the recipe's engine, chosen once (engines.engine_for)


def resolve_model_path(name: str) -> str:
    """``asset:smollm2[:LAYERS]`` → the cached local copy; anything else is returned unchanged."""
    try:
        return assets.resolve_name(name)
    except ValueError as err:
        raise RecipeError(f"model.name_or_path {err}") from None


def _check_dataset(key: str, spec: str | None) -> None:
    if spec is None or spec in DATASETS or spec in HUB_DATASETS:
        return
    if spec.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")) or "/" in spec:
        if not Path(spec).is_file():
            raise RecipeError(f"{key}: data file {spec!r} does not exist (relative paths resolve "
                              f"against {Path.cwd()})")
        try:  # parsed now, so a bad line fails in seconds, not after the model loaded
            load_examples(spec, split="train")
        except ValueError as err:
            raise RecipeError(f"{key}: {err}") from None
        return
    hint = difflib.get_close_matches(spec, list(DATASETS) + list(HUB_DATASETS), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise RecipeError(f"{key} must be one of {list(DATASETS) + list(HUB_DATASETS)} or a local "
                      f".json/.jsonl file, but got {spec!r}{extra}")


def _check_eval_split(rc: Recipe) -> None:
    dc = rc.data
    if not dc.eval_limit or dc.eval_split != "eval" or dc.eval not in (None, dc.train):
        return  # a separate data.eval is read whole (its train split, if it has no other)
    if not has_eval_split(dc.train):
        raise RecipeError(
            f"data.eval_limit={dc.eval_limit} asks for the eval split of data.train={dc.train!r}, "
            f"which has only a train split; set data.eval_split=holdout (hold {dc.eval_limit} "
            f"examples out of it), give data.eval=FILE, or set data.eval_limit=0")


def deepspeed_config(rc: Recipe, grad_accum: int, global_batch: int) -> dict[str, Any]:
    """The recipe's ``deepspeed:`` block completed with the batch layout of the train section."""
    cfg = {k: v for k, v in copy.deepcopy(rc.deepspeed).items() if v != "auto"}
    cfg.update(train_micro_batch_size_per_gpu=rc.train.micro_batch_size,
               gradient_accumulation_steps=grad_accum, train_batch_size=global_batch,
               gradient_clipping=rc.train.gradient_clipping, zero_allow_untested_optimizer=True)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def _check_options(rc: Recipe) -> None:
    valid = registry.spec(rc.optimizer.name).options()
    for key in rc.optimizer.options:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(f"optimizer.options.{key} is not an option of optimizer "
                              f"{rc.optimizer.name!r}{extra}; valid options: {sorted(valid)}")
    try:  # the values, against the optimizers' one table of hyper-parameter rules
        check_hyper(dict(rc.optimizer.options), "optimizer.options.")
    except ValueError as err:
        raise RecipeError(str(err)) from None


def _check_trackers(rc: Recipe) -> None:
    if rc.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise RecipeError("logging.wandb=true needs wandb: pip install 'riemann-zero[wandb]', "
                          "or set logging.wandb=false")


def _linear_shapes(model_config: Any) -> dict[str, tuple[int, int]]:
    """Names and (out, in) shapes of the Linear layers of the model, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _check_targets(rc: Recipe, shapes: dict[str, tuple[int, int]], arch: str) -> None:
    if rc.adapter.type != "lora":
        orthogonal_config(rc)  # PEFT's own check of the adapter.config keys
    leaves = sorted({n.rsplit(".", 1)[-1] for n in shapes})
    for target in rc.lora.target_modules:
        hits = [n for n in shapes if n == target or n.endswith("." + target)]
        if not hits:
            hint = difflib.get_close_matches(target, leaves, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise RecipeError(f"lora.target_modules: {target!r} matches no Linear layer of "
                              f"{arch}{extra} Linear layer names: {leaves}")
        for name in hits:
            m, n = shapes[name]
            if rc.adapter.type != "lora":  # OFT/BOFT: blocks must tile the input dimension
                block = rc.adapter.config.get("oft_block_size" if rc.adapter.type == "oft"
                                              else "boft_block_size", 0)
                if block and n % int(block):
                    raise RecipeError(f"adapter.config: block size {block} does not divide the "
                                      f"input dimension {n} of {name}; choose a divisor of {n}")
                continue
            problem = rank_error(rc.lora.r, m, n, name)  # the layout's own rule
            if problem is None and rc.init.method == "loi":
                problem = loi_rank_error(rc.lora.r, m, n, name)
            if problem is not None:
                raise RecipeError(f"lora.r={rc.lora.r} does not fit {name} ({m}x{n}): {problem}")


def trainable_params(patterns: list[str], named: dict[str, tuple[int, ...]], arch: str
                     ) -> dict[str, tuple[int, ...]]:
    """The parameters (name → shape) that ``model.trainable`` patterns match; a pattern that
    matches nothing (or is not a regular expression) is a RecipeError."""
    chosen: dict[str, tuple[int, ...]] = {}
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise RecipeError(f"model.trainable: {pattern!r} is not a regular expression "
                              f"({err})") from None
        hits = [n for n in named if rx.search(n)]
        if not hits:
            leaves = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in named})
            hint = difflib.get_close_matches(pattern, leaves, n=1, cutoff=0.3)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise RecipeError(f"model.trainable: {pattern!r} matches no parameter of "
                              f"{arch}{extra} Parameter names (N = layer index): {leaves}")
        chosen.update({n: named[n] for n in hits})
    return chosen


def _param_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every parameter of the model, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _check_output_dir(rc: Recipe, notes: list[str]) -> tuple[Path | None, bool]:
    out = Path(rc.output_dir)
    run_json = out / "run.json"
    checks = rc.train.verify_checkpoints == "checksum"
    if not run_json.is_file():
        if (out / "checkpoints").exists() or (out / "metrics.jsonl").exists():
            raise RecipeError(f"output_dir {str(out)!r} holds training files but no run.json; "
                              f"choose another output_dir or delete it")
        return None, False
    old = json.loads(run_json.read_text())
    status = old.get("status")
    if status != "finished" and not list_checkpoints(out / "checkpoints"):
        # Stopped before its first checkpoint (failed, diverged or killed; the lock says no run
        # is alive): nothing to resume, nothing to lose.
        notes.append(f"output_dir {out} holds a run that stopped before its first checkpoint "
                     f"(status {status!r}); replacing it")
        return None, False
    if rc.resume == "never":
        raise RecipeError(f"output_dir {str(out)!r} already holds a run; pass resume=auto to "
                          f"continue it or choose another output_dir")
    diffs = _recipe_diff(old.get("recipe", {}), recipe_to_dict(rc))
    if diffs:
        shown = "; ".join(f"{k}: {a!r} there vs {b!r} here" for k, a, b in diffs[:5])
        raise RecipeError(f"output_dir {str(out)!r} holds another run (recipe differs: {shown}); "
                          f"choose another output_dir or delete that one")
    if status == "finished":
        return None, True
    if rc.resume == "auto":
        try:
            found, skipped = resume_point(out / "checkpoints", checksums=checks)
        except CheckpointError as err:
            raise RecipeError(str(err)) from None
        if skipped:
            notes += skipped + [f"resuming from {found.name}, the newest intact checkpoint"]
        return found, False
    problem = verify_checkpoint(rc.resume, checksums=checks)
    if problem is not None:
        raise RecipeError(f"resume={rc.resume}: {problem}; pass resume=auto to take the newest "
                          f"intact checkpoint")
    return Path(rc.resume), False


def _recipe_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        dotted = f"{prefix}{key}"
        if dotted in RUN_NEUTRAL_KEYS:
            continue
        va, vb = a.get(key), b.get(key)
        if key not in a and vb in ({}, None):  # a key added since that run, left empty here
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _recipe_diff(va, vb, dotted + ".")
        elif va != vb:
            diffs.append((dotted, va, vb))
    return diffs


def local_ranks(world_size: int) -> int:
    """Ranks on this node, from the launcher (torchrun's ``LOCAL_WORLD_SIZE``, DeepSpeed's
    ``LOCAL_SIZE``); without one, all ranks."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return int(local) if local else world_size


def load_mode(rc: Recipe, trainable: dict[str, Any]) -> str:
    """How this run creates its base model, by name (``Plan.load_mode``; see
    :mod:`riemann_zero.train.engines.loading`): the engine's own partitioned load unless the
    start needs the whole base weight (:meth:`~riemann_zero.train.engines.base.Engine.load`)."""
    return engine_for(rc).load(trainable).name


def _check_memory(rc: Recipe, model_config: Any, shapes: dict[str, tuple[int, int]],
                  trainable: dict[str, tuple[int, ...]], world: int, local: int | None,
                  on_gpu: bool | None, engine: Engine, partitioned: bool) -> MemoryEstimate:
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    est = estimate_memory(rc, model_config, world=world, on_gpu=on_gpu, shapes=shapes,
                          trainable=trainable, partitioned=partitioned, engine=engine,
                          local_ranks=local if local is not None else local_ranks(world))
    if rc.memory.check:
        problem = memory_error(est, *memory_limits(rc, on_gpu), world=world)
        if problem is not None:
            raise RecipeError(problem)
    return est


def preflight(rc: Recipe, *, world_size: int = 1, model_config: Any = None,
              local: int | None = None, on_gpu: bool | None = None) -> Plan:
    """Check a recipe against the data, the model's architecture and the output directory.

    Reads at most the model's ``config.json`` (the model itself is built on the meta device).

    Args:
        rc: the recipe.
        world_size: number of data-parallel processes (fixes the gradient accumulation).
        model_config: a ``transformers`` config to use instead of reading ``model.name_or_path``
            (tests validate the Llama-3-8B recipes on a tiny same-architecture config).
        local: ranks per node for the memory estimate (None: from the launcher's environment).
        on_gpu: whether the memory estimate is for GPUs (None: ``torch.cuda.is_available()``).

    Raises:
        RecipeError: the first problem found, naming the key and the fix.
    """
    for key in _DS_OWNED:
        if key in rc.deepspeed and rc.deepspeed[key] != "auto":
            raise RecipeError(f"deepspeed.{key} is derived from the train section; remove it or "
                              f"set it to auto (train.micro_batch_size, "
                              f"train.gradient_accumulation_steps, train.global_batch_size, "
                              f"train.gradient_clipping)")
    zero = rc.deepspeed.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise RecipeError(f"deepspeed.zero_optimization.stage must be 0..3, but got {stage}")
    engine = engine_for(rc)
    # Only a real `true` counts here; any other value is left to DeepSpeed's schema check below.
    bf16 = (rc.deepspeed.get("bf16", {}) or {}).get("enabled", False) is True
    problem = engine.optimizer_error(rc.optimizer.name, rc.deepspeed, bf16=bf16)
    if problem is not None:
        raise RecipeError(problem)
    _check_options(rc)
    _check_trackers(rc)
    _check_dataset("data.train", rc.data.train)
    _check_dataset("data.eval", rc.data.eval)
    _check_eval_split(rc)
    if rc.data.eval_split == "holdout" and rc.data.eval not in (None, rc.data.train):
        raise RecipeError("data.eval_split=holdout holds examples out of data.train; leave "
                          "data.eval unset (or equal to data.train)")

    mb, gas, gbs = (rc.train.micro_batch_size, rc.train.gradient_accumulation_steps,
                    rc.train.global_batch_size)
    if gbs is not None:
        derived, rest = divmod(gbs, mb * world_size)
        if rest or derived == 0:
            raise RecipeError(f"train.global_batch_size={gbs} is not a multiple of "
                              f"train.micro_batch_size={mb} x world size {world_size}; change "
                              f"one of them")
        if gas is not None and gas != derived:
            raise RecipeError(f"train.gradient_accumulation_steps={gas} contradicts "
                              f"train.global_batch_size={gbs} = {mb} x {derived} x {world_size}; "
                              f"set only one of them")
        gas = derived
    gas = gas or 1

    path = resolve_model_path(rc.model.name_or_path)
    if model_config is None:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise RecipeError(f"model.name_or_path: cannot read the config of {path!r} ({err}); "
                              f"give a local model directory or a reachable hub id") from None
    ds_config = deepspeed_config(rc, gas, mb * gas * world_size)
    engine.check(ds_config)
    shapes = _linear_shapes(model_config)
    notes: list[str] = []
    trainable: dict[str, tuple[int, ...]] = {}
    if rc.model.trainable:  # full fine-tuning of the matched parameters; no LoRA
        row = registry.spec(rc.optimizer.name)
        if not row.full_finetune:
            ok = [s.name for s in registry.OPTIMIZERS.values() if s.full_finetune]
            raise RecipeError(f"model.trainable (full fine-tuning) needs one of the optimizers "
                              f"{ok}, but optimizer.name is {rc.optimizer.name!r}")
        trainable = trainable_params(list(rc.model.trainable), _param_shapes(model_config),
                                     type(model_config).__name__)
        notes.append(f"model.trainable matched {len(trainable)} parameters: " + ", ".join(
            f"{n} {tuple(s)}" for n, s in trainable.items()))
    else:
        _check_targets(rc, shapes, type(model_config).__name__)
    load = engine.load(trainable)
    memory = _check_memory(rc, model_config, shapes, trainable, world_size, local, on_gpu,
                           engine, load.partitioned)
    resume_from, finished = _check_output_dir(rc, notes)
    return Plan(model_path=path, model_config=model_config, grad_accum=gas,
                global_batch=mb * gas * world_size, resume_from=resume_from, finished=finished,
                linear_shapes=shapes, deepspeed=ds_config, notes=notes, trainable=trainable,
                memory=memory, load_mode=load.name, engine=engine)
