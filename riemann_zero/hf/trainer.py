"""Riemannion inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` (docs/design.md §10).

:class:`Trainer` (a ``transformers.Trainer``) and :class:`SFTTrainer` (a ``trl.SFTTrainer``) take
everything their parents take plus

- ``rz_optimizer="riemannion"``: any manifold optimizer of :mod:`riemann_zero.optim.registry`;
- ``rz_optimizer_kwargs=None``: its other hyper-parameters, e.g. ``{"momentum": 0.9}``; the lr and
  weight decay are ``TrainingArguments.learning_rate`` / ``weight_decay`` (and Adam's betas/eps
  ``adam_beta1/2`` / ``adam_epsilon`` where the optimizer has them), the schedule, warm-up,
  gradient accumulation and clipping are the Trainer's own;
- ``rz_init="loi"``: ``"loi"``, ``"zero"``, ``"random"`` or ``"keep"`` (keep the model's adapters
  as they are: a manifold-layout model, or a stock LoRA converted with ΔW kept exactly);
- ``rz_init_kwargs=None``: LOI's ``batches`` (calibration micro-batches per rank, the first ones
  of the train dataloader; default 4), ``p``, ``q``, ``alpha``.

How it fits into the Trainer:

- the optimizer is built in ``create_optimizer``, which the Trainer's DeepSpeed integration calls
  after resetting ``trainer.optimizer`` (a DeepSpeed config with an ``optimizer`` block, or
  ``optimizers=(...)``, would replace it: both are refused at construction);
- a stock PEFT LoRA model is converted to the manifold layout at construction; LOI runs at the
  start of ``train()``, before DeepSpeed/FSDP wrap the model, on each rank's own calibration
  batches with the sketches summed over the data-parallel ranks;
- under FSDP2 the model is sharded (accelerate's own preparation, lora_A on ``Shard(1)``) before
  the optimizer is built on its DTensor parameters; on CPU processes accelerate's state is
  completed for DeepSpeed and FSDP, and a Trainer that sees fewer processes than the launcher
  started is refused (:mod:`riemann_zero.hf.state`);
- ``save_model()`` and every checkpoint write a stock PEFT adapter relative to the ORIGINAL base
  (:func:`riemann_zero.save_adapter`); a checkpoint also holds the manifold-layout adapter
  (``riemann_zero_state.safetensors``) from which ``train(resume_from_checkpoint=...)`` continues
  (under DeepSpeed, DeepSpeed's own checkpoint in the same folder does; under FSDP, the manifold
  optimizer's rows are saved per rank) and which ``load_best_model_at_end`` loads;
- logged steps add the manifold health (``manifold/orth_err_U`` …) and the optimizer's bytes per
  collective of its last step (``comm/all_reduce.gram_m`` …) to ``Trainer.log()``, so they reach
  every ``report_to``.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from riemann_zero.adapters.export import save_adapter
from riemann_zero.adapters.layout import RANK_ATTR, convert, find_adapters, init_points, lora_layers
from riemann_zero.adapters.loi import loi_init
from riemann_zero.hf.state import (
    check_world,
    complete_deepspeed_state,
    complete_fsdp_state,
    is_fsdp2,
    shard_fsdp2,
)
from riemann_zero.optim import registry
from riemann_zero.optim.metrics import step_metrics
from riemann_zero.sharding.comm import sketch_reduce
from riemann_zero.sharding.layouts import layout_of
from riemann_zero.sharding.params import full_tensor, gathered
from riemann_zero.train.engines.deepspeed import DeepSpeedEngine

__all__ = ["Trainer", "SFTTrainer", "STATE_NAME", "RZ_INITS"]  # noqa: F822 (SFTTrainer: __getattr__)

RZ_INITS = ("loi", "zero", "random", "keep")
STATE_NAME = "riemann_zero_state.safetensors"  # the manifold-layout adapter of a checkpoint
_LOI_KEYS = ("batches", "p", "q", "alpha")
_FROM_ARGS = ("lr", "weight_decay", "betas", "eps")  # set by TrainingArguments


def _manifold_names() -> list[str]:
    return [n for n, row in registry.OPTIMIZERS.items() if row.layout == "manifold"]


def _ds_config(ds: Any) -> dict | None:
    """The DeepSpeed config of ``TrainingArguments.deepspeed`` (a dict or a JSON file)."""
    if ds is None:
        return None
    if isinstance(ds, dict):
        return ds
    if hasattr(ds, "config"):  # HfDeepSpeedConfig / accelerate's plugin
        return ds.config
    return json.loads(Path(ds).read_text())


def _optimizer_block_error(config: dict | None) -> str | None:
    if config and "optimizer" in config:
        return ("the DeepSpeed config has an 'optimizer' block, which would replace the manifold "
                "optimizer by DeepSpeed's own; remove the 'optimizer' block (keep 'scheduler' "
                "out too: TrainingArguments set the schedule)")
    return None


def check_options(rz_optimizer: str, rz_optimizer_kwargs: dict | None, rz_init: str,
                  rz_init_kwargs: dict | None, optimizers: Any, ds_config: dict | None,
                  args_bf16: bool = False) -> None:
    """The construction-time refusals, each one ``ValueError`` line (why and what to change)."""
    names = _manifold_names()
    if rz_optimizer not in names:
        raise ValueError(f"rz_optimizer={rz_optimizer!r} is not a manifold optimizer; use one of "
                         f"{', '.join(names)}")
    row = registry.spec(rz_optimizer)
    if optimizers is not None and any(o is not None for o in optimizers):
        raise ValueError("optimizers=(...) was passed together with rz_optimizer: it would "
                         "replace the manifold optimizer; drop optimizers=, or use the plain "
                         "transformers Trainer for your own optimizer")
    problem = _optimizer_block_error(ds_config)
    if problem:
        raise ValueError(problem)
    valid = [k for k in row.recipe_keys + row.options() if k not in _FROM_ARGS]
    for key in rz_optimizer_kwargs or {}:
        if key in _FROM_ARGS:
            raise ValueError(f"rz_optimizer_kwargs sets {key!r}, which comes from "
                             f"TrainingArguments; set it there (learning_rate, weight_decay, "
                             f"adam_beta1/adam_beta2, adam_epsilon) and drop it here")
        if key not in valid:
            raise ValueError(f"rz_optimizer_kwargs: {rz_optimizer} has no option {key!r}; valid: "
                             f"{', '.join(valid)}")
    if rz_init not in RZ_INITS:
        raise ValueError(f"rz_init={rz_init!r} is not one of {', '.join(RZ_INITS)}")
    unknown = set(rz_init_kwargs or {}) - set(_LOI_KEYS)
    if unknown:
        raise ValueError(f"rz_init_kwargs: unknown keys {sorted(unknown)}; valid: "
                         f"{', '.join(_LOI_KEYS)}")
    if ds_config:
        enabled = (ds_config.get("bf16") or {}).get("enabled", False)
        bf16 = enabled is True or (enabled == "auto" and args_bf16)
        # The driver's DeepSpeed engine describes where the optimizer would run.
        problem = DeepSpeedEngine.optimizer_error(rz_optimizer, ds_config, bf16=bf16)
        if problem:
            raise ValueError(problem)


def _is_manifold(model) -> bool:
    return any(hasattr(m, RANK_ATTR) for _, m in lora_layers(model))


class _Riemann:
    """The Riemannion half of :class:`Trainer` and :class:`SFTTrainer` (mixed in first)."""

    def __init__(self, *args, rz_optimizer: str = "riemannion",
                 rz_optimizer_kwargs: dict | None = None, rz_init: str = "loi",
                 rz_init_kwargs: dict | None = None, **kwargs) -> None:
        parent = super().__init__
        bound = inspect.signature(parent).bind_partial(*args, **kwargs).arguments
        targs = bound.get("args")
        check_options(rz_optimizer, rz_optimizer_kwargs, rz_init, rz_init_kwargs,
                      bound.get("optimizers"),
                      _ds_config(getattr(targs, "deepspeed", None)),  # an attribute, not a switch
                      args_bf16=bool(getattr(targs, "bf16", False)))
        if targs is not None:
            complete_deepspeed_state(targs)  # CPU processes: the world DeepSpeed set up
        super().__init__(*args, **kwargs)
        check_world(self.accelerator)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        problem = _optimizer_block_error(getattr(plugin, "deepspeed_config", None))
        if problem:  # a DeepSpeed config from `accelerate launch --deepspeed_config_file`
            raise ValueError(problem)
        self.rz_optimizer, self.rz_init = rz_optimizer, rz_init
        self.rz_optimizer_kwargs = dict(rz_optimizer_kwargs or {})
        self.rz_init_kwargs = {"batches": 4, "p": 16, "q": 1, "alpha": None,
                               **(rz_init_kwargs or {})}
        self.rz_client_optimizer = None
        self._rz_started = False
        model = self.model
        if not _is_manifold(model):
            convert(model)  # stock PEFT LoRA → rank-2r manifold layout, ΔW kept exactly
        elif rz_init != "keep":
            raise ValueError(f"the model is already in the manifold layout; pass rz_init='keep' "
                             f"to train it as it is (rz_init={rz_init!r} would reset it)")
        if rz_init in ("zero", "random"):
            init_points(find_adapters(model), rz_init, seed=self.args.seed)
            self._rz_started = True
        elif rz_init == "keep":
            self._rz_started = True

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        complete_fsdp_state(self)  # CPU processes: FSDP as asked, not DDP

    # ---------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        """The registry's manifold optimizer on the model (DeepSpeed's integration calls this).

        Under FSDP2 the Trainer builds the optimizer before ``accelerator.prepare`` shards the
        model, but the manifold optimizer resolves its row shards from the parameters it is given:
        the model is sharded here first (accelerate's own FSDP2 preparation, lora_A on
        ``Shard(1)``), so the optimizer sees the DTensor parameters the training will use."""
        if self.optimizer is None:
            if is_fsdp2(self) and model is None:
                self.model = self.model_wrapped = shard_fsdp2(self.accelerator, self.model)
            target = self.model if model is None else model
            row = registry.spec(self.rz_optimizer)
            a = self.args
            common = {"lr": a.learning_rate, "weight_decay": a.weight_decay,
                      "betas": (a.adam_beta1, a.adam_beta2), "eps": a.adam_epsilon}
            kw = {k: v for k, v in common.items() if k in row.recipe_keys}
            self.optimizer = row.build(target, **kw, **self.rz_optimizer_kwargs)
            self.rz_client_optimizer = self.optimizer
        return self.optimizer

    # ------------------------------------------------------------------------------- LOI
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        self._rz_loi()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _rz_loi(self) -> None:
        """LOI on the first calibration micro-batches of this rank's train dataloader, before
        any engine wraps the model; every rank derives the same ΔW₀ (summed sketches). On resume
        it runs again (deterministic), then the checkpoint overwrites the adapters."""
        if self._rz_started:
            return
        model = self.model
        if not all(layout_of(p).whole for p in model.parameters()):
            raise ValueError("rz_init='loi' needs unpartitioned weights, but the model was loaded "
                             "under ZeRO-3's zero.Init; load it before creating TrainingArguments"
                             "(deepspeed=...) or use rz_init='zero'")
        device = self.args.device
        if next(model.parameters()).device != device:
            model.to(device)
        accepted = set(inspect.signature(model.get_base_model().forward).parameters)
        n = int(self.rz_init_kwargs["batches"])
        batches = []
        for batch in self.get_train_dataloader():
            if len(batches) == n:
                break
            batches.append({k: (v.to(device) if torch.is_tensor(v) else v)
                            for k, v in batch.items() if k in accepted})
        kw = {k: self.rz_init_kwargs[k] for k in ("p", "q", "alpha")}
        loi_init(model, batches, seed=self.args.seed, reduce=sketch_reduce(), **kw)
        self._rz_started = True

    # ---------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        opt = self.rz_client_optimizer
        if opt is not None and "loss" in logs:  # training logs: the same steps on every rank
            logs = dict(logs)
            logs.update(step_metrics(opt))
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving / resuming
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A stock PEFT adapter relative to the original base (+ the manifold-layout state for
        resuming) in ``output_dir``; collective under ZeRO-3/FSDP (every rank calls it)."""
        out = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        main = self.args.should_save
        staging = out / ".riemann_zero_adapter"
        save_adapter(model, staging)  # collective; rank 0 writes (atomically, in a sibling)
        state = self._rz_state(model)
        if main:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            for f in staging.iterdir():  # the adapter files beside whatever else is there
                os.replace(f, out / f.name)
            shutil.rmtree(staging)
            save_file(state, str(out / STATE_NAME))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(out))
            torch.save(self.args, out / "training_args.bin")
        self.accelerator.wait_for_everyone()  # the folder is complete when any rank returns
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    @staticmethod
    def _rz_state(model) -> dict[str, torch.Tensor]:
        """Trainable parameters (manifold layout) and LOI's ΔW₀ buffers, whole, on CPU."""
        keep = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        keep += [(n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in
                 ("loi_B0", "loi_A0")]
        with gathered([t for _, t in keep if isinstance(t, torch.nn.Parameter)]):
            return {n: full_tensor(t).detach().cpu().clone().contiguous() for n, t in keep}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = Path(resume_from_checkpoint) / STATE_NAME
        if not path.exists():
            raise ValueError(f"{resume_from_checkpoint} has no {STATE_NAME}: it was not written "
                             f"by riemann_zero.hf; resume from one of its checkpoints")
        from safetensors.torch import load_file

        state = load_file(str(path))
        target = self.model if model is None else model
        own = dict(target.named_parameters()) | dict(target.named_buffers())
        missing = sorted(set(state) - set(own))
        if missing:
            raise ValueError(f"{path} names tensors this model lacks ({missing[:3]}); build the "
                             f"same model (LoRA targets, rank, rz_init) to resume")
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            for name, value in state.items():  # the same order on every rank (FSDP2: collective)
                dest = own[name]
                value = value.to(dest.device)
                if isinstance(dest, DTensor):
                    value = distribute_tensor(value, dest.device_mesh, dest.placements)
                dest.copy_(value)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's manifold-layout adapter (and LOI's
        ΔW₀), not its exported adapter, which is relative to the original base. DeepSpeed loads
        its own checkpoint of the same folder, as in the parent."""
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint, self.model_wrapped)

    # Under FSDP the parent saves the optimizer through torch.distributed.checkpoint, which keeps
    # only torch.optim's state/param_groups (dropping the per-adapter momentum) and, finding that
    # state empty, runs a zero-lr step() that decays the momentum: the manifold optimizer's own
    # state_dict (this rank's rows) is saved per rank instead, as in train/engines/fsdp2.py.
    def _rz_optimizer_file(self, checkpoint: str) -> Path:
        return Path(checkpoint) / f"rz_optimizer_rank{self.args.process_index}.pt"

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        torch.save(self.rz_client_optimizer.state_dict(), self._rz_optimizer_file(output_dir))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / "scheduler.pt")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self.is_fsdp_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = self._rz_optimizer_file(checkpoint)
        if not path.exists():
            raise ValueError(f"{checkpoint} has no {path.name}: resume with the same number of "
                             f"FSDP processes that wrote it")
        self.rz_client_optimizer.load_state_dict(torch.load(path, weights_only=False))
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt"))


def __getattr__(name: str):
    """``SFTTrainer`` is built on first use, so ``riemann_zero.hf`` imports without TRL."""
    if name != "SFTTrainer":
        raise AttributeError(name)
    try:
        import trl
    except ImportError as err:
        raise ImportError("riemann_zero.hf.SFTTrainer needs TRL: pip install "
                          "'riemann-zero[trl]'") from err

    cls = type("SFTTrainer", (_Riemann, trl.SFTTrainer), {
        "__module__": __name__,
        "__doc__": "``trl.SFTTrainer`` with a manifold optimizer (see :mod:`riemann_zero.hf`).",
    })
    globals()["SFTTrainer"] = cls
    return cls


def _trainer_class():
    import transformers

    return type("Trainer", (_Riemann, transformers.Trainer), {
        "__module__": __name__,
        "__doc__": "``transformers.Trainer`` with a manifold optimizer (see "
                   ":mod:`riemann_zero.hf`).",
    })


Trainer = _trainer_class()
