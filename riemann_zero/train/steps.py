"""The pieces the training loop calls: one optimizer step over its micro-batches with the
reduction every rank takes part in, the finiteness checks and divergence message, the eval loss,
peak memory, the metrics log (``metrics.jsonl`` and the trackers) and the run's outputs (the
exported adapter, or the fully fine-tuned parameters)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from riemann_zero.adapters.export import save_adapter, save_peft_adapter
from riemann_zero.io import peak_rss_mib, write_text_atomically
from riemann_zero.sharding.params import full_tensor, gathered, local_values
from riemann_zero.train.batches import RunData, collate, count_tokens
from riemann_zero.train.engines import Engine
from riemann_zero.train.recipe import Recipe
from riemann_zero.train.tracking import Trackers

__all__ = ["Diverged", "divergence", "skip_allowance", "eval_loss", "peak_rss", "trainable",
           "nonfinite", "state_bytes", "StepResult", "train_step", "nonfinite_values", "Tally",
           "MetricsLog", "save_outputs"]


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient norm or parameter; nothing of that step was
    saved. The message is one line: the step, what was non-finite, the lr and what to try."""


def divergence(step: int, lr: float, what: str, newest: Path | None) -> Diverged:
    kept = f"the newest checkpoint, {newest}, is finite" if newest else "no checkpoint was written"
    return Diverged(f"training diverged at step {step}: non-finite {what} at lr {lr:.3g}; nothing "
                    f"of this step was saved and {kept}. Try a lower optimizer.lr (e.g. "
                    f"{lr / 10:.1g}), more schedule.warmup_steps or train.gradient_clipping, in a "
                    f"new output_dir")


def skip_allowance(recipe: Recipe) -> int:
    """Steps with a non-finite loss the run tolerates when the engine skipped their update
    (``train.skip_nonfinite_steps``; unset: 0 in fp32, 3 with bf16/fp16)."""
    if recipe.train.skip_nonfinite_steps is not None:
        return recipe.train.skip_nonfinite_steps
    ds = recipe.deepspeed
    low = any(bool((ds.get(k) or {}).get("enabled", False)) for k in ("bf16", "fp16"))
    return 3 if low else 0


@torch.no_grad()
def eval_loss(engine: Engine, data: RunData, recipe: Recipe, rank: int, world: int
              ) -> float | None:
    """Token-weighted mean loss over the eval set (every rank takes an equal share)."""
    items = data.eval
    if not items:
        return None
    engine.train(False)
    mb = recipe.train.micro_batch_size
    per_rank = len(items) // world
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), mb):
        batch = collate(items, mine[i:i + mb], data.collator, engine.device)
        n = count_tokens(batch)
        loss = engine(**batch).loss.float().item()
        total += torch.tensor([loss * n, n], dtype=torch.float64)
    dist.all_reduce(total)
    engine.train(True)
    return float(total[0] / total[1]) if total[1] > 0 else None


def peak_rss(rank: int, world: int) -> list[float]:
    """Every rank's peak resident memory so far, MiB (collective; 0 where not measurable)."""
    rss = torch.zeros(world, dtype=torch.float64)
    rss[rank] = peak_rss_mib() or 0.0
    dist.all_reduce(rss)
    return [round(float(v), 1) for v in rss]


def trainable(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def nonfinite(params: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of trainable parameters holding a NaN or an infinity in this rank's part (one pass
    over the adapters; no communication)."""
    if not params:
        return []
    # One flag per tensor on its device, then a single host transfer: no sync per tensor.
    flags = [torch.isfinite(local_values(p).detach()).all() for _, p in params]
    flags = torch.stack([f.to(flags[0].device) for f in flags]).cpu().tolist()
    return [name for (name, _), ok in zip(params, flags) if not ok]


def state_bytes(params: list[tuple[str, torch.Tensor]]) -> int:
    """Rough size of a first checkpoint: each trainable value with its fp32 master and two
    optimizer moments (later checkpoints use the size of the previous one)."""
    return sum(4 * 4 * int(getattr(p, "ds_numel", p.numel())) for _, p in params)


@dataclass
class StepResult:
    """One optimizer step as every rank sees it after the reduction."""

    loss: float  # mean over micro-batches and ranks
    tokens: int  # over all ranks
    bad_tensors: int  # trainable tensors with a non-finite value, over all ranks
    peak_rss_mib: list[float]
    step_time: float
    optim_time: float


def train_step(engine: Engine, data: RunData, step: int, grad_accum: int,
               params: list[tuple[str, torch.Tensor]], rank: int, world: int) -> StepResult:
    """Forward, backward and engine step of the ``grad_accum`` micro-batches of optimizer step
    ``step``, then one all-reduce of the loss, the tokens, the count of non-finite trainable
    tensors (divergence rides on it) and every rank's peak RSS."""
    t0 = time.perf_counter()
    loss_sum, tokens, optim_time = 0.0, 0, 0.0
    for a in range(grad_accum):
        batch = data.micro_batch((step - 1) * grad_accum + a, engine.device)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else \
            batch["input_ids"].numel()
        loss = engine(**batch).loss
        engine.backward(loss)
        loss_sum += float(loss.detach().float())
        t_opt = time.perf_counter()
        engine.step()
        if a == grad_accum - 1:
            optim_time = time.perf_counter() - t_opt
    bad = nonfinite(params)
    rss = [0.0] * world
    rss[rank] = peak_rss_mib() or 0.0
    reduced = torch.tensor([loss_sum / grad_accum, tokens, len(bad), *rss], dtype=torch.float64)
    dist.all_reduce(reduced)
    return StepResult(loss=float(reduced[0] / world), tokens=int(reduced[1]),
                      bad_tensors=int(reduced[2]),
                      peak_rss_mib=[round(float(v), 1) for v in reduced[3:]],
                      step_time=time.perf_counter() - t0, optim_time=optim_time)


def nonfinite_values(result: StepResult, grad_norm: float | None) -> list[str]:
    """What of a step is non-finite among its loss and its gradient norm."""
    return [w for w, bad in [("loss", not math.isfinite(result.loss)),
                             ("gradient norm", grad_norm is not None
                              and not math.isfinite(grad_norm))] if bad]


@dataclass
class Tally:
    """What the loop has seen so far: losses, tokens, skipped steps, the newest checkpoint."""

    allowance: int
    newest: Path | None
    first_loss: float | None = None
    last_loss: float | None = None
    tokens: int = 0
    skipped: int = 0

    def count(self, result: StepResult) -> None:
        self.tokens += result.tokens
        self.first_loss = result.loss if self.first_loss is None else self.first_loss
        self.last_loss = result.loss


class MetricsLog:
    """``metrics.jsonl`` and the trackers (rank 0 writes). A run that resumes at ``start`` drops
    the lines written after that checkpoint (a fresh start: all of them)."""

    def __init__(self, out: Path, logging: Any, *, rank: int, start: int, config: dict) -> None:
        self.path, self.rank = out / "metrics.jsonl", rank
        if rank == 0:
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            kept = [ln for ln in lines if start and json.loads(ln).get("step", 0) <= start]
            write_text_atomically(self.path, "".join(ln + "\n" for ln in kept))
        self.trackers = Trackers(logging, out, rank=rank, start=start, config=config)

    def emit(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.trackers.write(record)

    def close(self) -> None:
        self.trackers.close()


def save_outputs(engine: Engine, out: Path, trained: list[str], *, manifold: bool, rank: int
                 ) -> Path:
    """The run's result: the fully fine-tuned parameters (``trained`` names) or the adapter;
    returns its folder."""
    if trained:
        _save_trained(engine, out / "trained", trained, rank=rank)
        return out / "trained"
    _save_adapter(engine, out / "adapter", manifold=manifold, rank=rank)
    return out / "adapter"


def _save_adapter(engine: Engine, out_dir: Path, *, manifold: bool, rank: int) -> None:
    """A stock PEFT adapter relative to the original base (after LOI, PiSSA or LoRA-GA too)."""
    module = engine.module
    if manifold:
        save_adapter(module, out_dir)  # collective under ZeRO-3/FSDP2; rank 0 writes
        return
    state = engine.full_state_dict()  # collective where the engine shards the module
    lora = [p for n, p in module.named_parameters() if "lora_" in n]
    with gathered(lora):  # ZeRO-3 parameters made whole; a no-op elsewhere
        if rank == 0:
            save_peft_adapter(module, out_dir, state_dict=state)


def _save_trained(engine: Engine, out_dir: Path, names: list[str], rank: int) -> None:
    """Full fine-tuning: the trained parameters, whole, as ``out_dir/params.pt`` ({name: tensor})
    (FSDP2 DTensors and ZeRO-3 partitions gathered; rank 0 writes)."""
    named = dict(engine.module.named_parameters())
    params = [named[n] for n in names]
    with gathered(params):
        state = {n: full_tensor(p).detach().float().cpu().clone() for n, p in zip(names, params)}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, out_dir / "params.pt")
